"""Alerts over a finished history computed in worker processes: the serial output, line for line."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from lmtop.tui import alert_workers, headless
from lmtop.tui.alert_settings import AlertSettings
from runs import write_run

# Every rank at once (one event: one alert naming the ranks), from a few hundred steps in.
EVENTS = {
    600: {"grad_norm": 40.0},
    900: {"loss": 30.0},
    1300: {"loss": math.nan},
}


def _history(folder: Path, ended: bool = True) -> Path:
    """Two finished runs: 4 ranks with events, evaluations and a config, and a lone rank."""
    write_run(folder, "big", ranks=4, steps=1600, extra=EVENTS, eval_every=25, ended=ended)
    write_run(folder, "small", ranks=1, steps=300, extra={150: {"grad_norm": 50.0}})
    return folder


def _headless(folder: Path, monkeypatch: pytest.MonkeyPatch, workers: bool) -> tuple[bytes, Any]:
    """``lmtop --headless --no-follow FOLDER``'s output, and the workers it started (or None)."""
    started: list[Any] = []
    start = alert_workers.start

    def watched(*args: Any) -> Any:
        started.append(start(*args))
        return started[-1]

    monkeypatch.setattr(alert_workers, "start", watched)
    monkeypatch.setattr(alert_workers, "MIN_BYTES", 0 if workers else 1 << 62)
    out = io.BytesIO()
    status = headless.run(
        [str(folder)], follow=False, out=out, settings=AlertSettings(snapshots=False)
    )
    assert status == 2  # the NaN is critical
    return out.getvalue(), started[0] if started else None


def _alerts(output: bytes) -> list[dict[str, Any]]:
    return [r for r in map(orjson.loads, output.splitlines()) if r["kind"] == "alert"]


def test_workers_give_the_serial_output_line_for_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every message and every alert, in the same places: the events seen by the 4 ranks of
    one run as one alert naming them, the other run's own."""
    folder = _history(tmp_path)
    parallel, workers = _headless(folder, monkeypatch, workers=True)
    serial, none = _headless(folder, monkeypatch, workers=False)
    assert workers is not None and none is None
    assert parallel == serial
    alerts = _alerts(parallel)
    merged = [(a["type"], a["metric"], a["step"], a["ranks"]) for a in alerts if a["run"] == "big"]
    for step, metric in ((600, "grad_norm"), (900, "loss"), (1300, "loss")):
        assert any(s == step and m == metric and r == [0, 1, 2, 3] for _, m, s, r in merged)
    assert any(a["run"] == "small" and a["step"] == 150 for a in alerts)


def test_a_run_still_written_is_read_on_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank file without its end message may grow while it is read: no workers."""
    folder = _history(tmp_path, ended=False)
    _, workers = _headless(folder, monkeypatch, workers=True)
    assert workers is None


def test_a_worker_that_dies_stops_the_alerts_with_a_note_not_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed mid-way (an OOM killer, say): every message is still printed, the alerts stop
    with one 'internal' warning, and nothing waits for ever."""
    folder = _history(tmp_path)
    serial, _ = _headless(folder, monkeypatch, workers=False)
    start = alert_workers.start

    def killed(*args: Any) -> Any:
        workers = start(*args)
        assert workers is not None
        for process, _ in workers._workers:
            process.kill()
        return workers

    monkeypatch.setattr(alert_workers, "start", killed)
    monkeypatch.setattr(alert_workers, "MIN_BYTES", 0)
    out = io.BytesIO()
    headless.run([str(folder)], follow=False, out=out, settings=AlertSettings(snapshots=False))
    lines = out.getvalue().splitlines()
    messages = [line for line in lines if b'"kind":"alert"' not in line]
    assert messages == [line for line in serial.splitlines() if b'"kind":"alert"' not in line]
    internal = [r for r in _alerts(out.getvalue()) if r["type"] == "internal"]
    assert len(internal) == 1 and "alert worker" in internal[0]["message"]
