"""Alerts over a finished history computed in worker processes: the serial output, line for line."""

from __future__ import annotations

import errno
import io
import math
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from lmtop.tui import alert_workers, headless
from lmtop.tui.alert_settings import AlertSettings
from lmtop.tui.runbook import RunBook
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
    monkeypatch.setattr(alert_workers, "cores", lambda: 2)  # a CI box may lend one core
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
    # The workers' alerts were the ones told: each covered rank's file read to its end by its
    # worker, and every alert it sent taken by the engine here.
    covered = sorted(rank for _, rank in workers.known.covered)
    assert covered == [0, 0, 1, 2, 3] and not workers.known.alerts
    for (key, rank), offset in workers._read.items():
        assert offset == (Path(key) / f"rank-{rank}.jsonl").stat().st_size
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
    with one critical 'internal' notice, and nothing waits for ever."""
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
    monkeypatch.setattr(alert_workers, "cores", lambda: 2)
    out = io.BytesIO()
    status = headless.run(
        [str(folder)], follow=False, out=out, settings=AlertSettings(snapshots=False)
    )
    lines = out.getvalue().splitlines()
    messages = [line for line in lines if b'"kind":"alert"' not in line]
    assert messages == [line for line in serial.splitlines() if b'"kind":"alert"' not in line]
    internal = [r for r in _alerts(out.getvalue()) if r["type"] == "internal"]
    assert len(internal) == 1 and "alert worker" in internal[0]["message"]
    # The NaN the lost worker would have judged is not there to make the exit status 2: the
    # notice itself is critical, so a script still sees the history was not judged whole.
    assert internal[0]["severity"] == "critical" and status == 2


def _without_config(run_dir: Path, rank: int) -> None:
    """Rewrites the rank's start message without its config (a rank the script did not give
    one: ``hooks.init(config=...)`` on rank 0 only)."""
    path = run_dir / f"rank-{rank}.jsonl"
    first, rest = path.read_bytes().split(b"\n", 1)
    start = orjson.loads(first)
    del start["info"]["config"]
    path.write_bytes(orjson.dumps(start) + b"\n" + rest)


def test_ranks_started_with_different_configs_are_read_on_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine on one process lends a run's config (max_grad_norm, warm-up) to all its
    ranks; workers would see only their own ranks': no workers, the serial alerts."""
    folder = _history(tmp_path)
    for rank in (1, 2, 3):
        _without_config(folder / "big", rank)
    _, workers = _headless(folder, monkeypatch, workers=True)
    assert workers is None


def test_a_rank_file_that_is_a_fifo_is_not_waited_on(tmp_path: Path) -> None:
    """A neighbour's FIFO in a rank file's place (swapped in after the first read): looking
    at its last line neither blocks nor reads without end; the run is not called finished."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    os.mkfifo(run_dir / "rank-0.jsonl")
    (run_dir / "rank-1.jsonl").symlink_to("/dev/zero")
    run = RunBook().run(str(run_dir), "r", run_dir)
    assert not alert_workers._finished(run, 0)
    assert not alert_workers._finished(run, 1)


def test_workers_that_cannot_start_leave_the_alerts_to_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process or file limit (EAGAIN, EMFILE on a shared box): the serial output, no error."""
    folder = _history(tmp_path)
    serial, _ = _headless(folder, monkeypatch, workers=False)

    real = alert_workers.get_context("spawn")
    opened: list[Any] = []

    class Limited:
        """Pipes open; the second process cannot start."""

        def Pipe(self, duplex: bool) -> Any:
            ends = real.Pipe(duplex=duplex)
            opened.extend(ends)
            return ends

        def Process(self, **kwargs: Any) -> Any:
            if len(opened) > 2:
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            return real.Process(**kwargs)

    monkeypatch.setattr(alert_workers, "get_context", lambda method: Limited())
    output, workers = _headless(folder, monkeypatch, workers=True)
    assert workers is None and output == serial
    assert len(opened) == 4 and all(end.closed for end in opened)  # no pipe left open
