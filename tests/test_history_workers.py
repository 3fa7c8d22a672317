"""A finished history read by worker processes: every message in per-rank order, the serial
alerts, each after the messages that raised it."""

from __future__ import annotations

import errno
import io
import math
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from lmtop.hooks import schema
from lmtop.tui import headless, history_workers
from lmtop.tui.alert_settings import AlertSettings
from lmtop.tui.alerts import Alert, AlertEngine, OnceByStep
from lmtop.tui.runbook import RunBook
from runs import T0, curve, write_run
from runs import line as make_line

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


def _headless(
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: bool,
    snapshots: bool = False,
    alerts: bool = True,
    status: int = 2,  # the NaN is critical
    kill: tuple[int, int] | None = None,
) -> tuple[bytes, Any]:
    """``lmtop --headless --no-follow FOLDER``'s output, and the workers it started (or None).
    Workers read 32 KB at a time: each rank in a dozen chunks, which the ranks' steps cross.
    ``kill``: (worker, chunks): that worker is killed (SIGKILL, as the OOM killer does) once
    this process took that many chunks from the workers."""
    started: list[Any] = []
    start = history_workers.start

    def watched(*args: Any) -> Any:
        started.append(start(*args))
        if kill is not None and started[-1] is not None:
            _kill_later(started[-1], *kill)
        return started[-1]

    monkeypatch.setattr(history_workers, "start", watched)
    monkeypatch.setattr(history_workers, "MIN_BYTES", 0 if workers else 1 << 62)
    monkeypatch.setattr(history_workers, "MIN_BYTES_UNJUDGED", 0 if workers else 1 << 62)
    monkeypatch.setattr(history_workers, "CHUNK_BYTES", 32 << 10)
    monkeypatch.setattr(history_workers, "cores", lambda: 2)  # a CI box may lend one core
    out = io.BytesIO()
    settings = AlertSettings(enabled=alerts, snapshots=snapshots)
    assert headless.run([str(folder)], follow=False, out=out, settings=settings) == status
    return out.getvalue(), started[0] if started else None


def _kill_later(workers: Any, worker: int, after: int) -> None:
    process = workers._workers[worker][0]
    receive = workers._receive
    taken: list[int] = []

    def receive_then_kill(index: int) -> Any:
        if len(taken) == after:
            process.kill()
            process.join()
        taken.append(index)
        return receive(index)

    workers._receive = receive_then_kill


def _records(output: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.splitlines()]


def _alerts(output: bytes) -> list[dict[str, Any]]:
    return [r for r in _records(output) if r["kind"] == "alert"]


def _per_rank(output: bytes) -> dict[tuple[str, int], list[bytes]]:
    """Each rank's message lines, in the order printed."""
    ranks: dict[tuple[str, int], list[bytes]] = {}
    for line in output.splitlines():
        record = orjson.loads(line)
        if record["kind"] != "alert":
            ranks.setdefault((record["run"], record["rank"]), []).append(line)
    return ranks


@pytest.mark.parametrize("forked", [True, False])
def test_workers_give_every_message_in_rank_order_and_the_serial_alerts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forked: bool
) -> None:
    """Every message once, each rank's in its order, byte for byte; the serial path's alerts,
    the events seen by the 4 ranks of one run as one alert naming them, each printed after
    every message that raised it and while the history is still being printed. Workers
    forked (``lmtop --headless --no-follow`` on Linux) or spawned (elsewhere)."""
    monkeypatch.setattr(history_workers, "_forks", lambda: forked)
    folder = _history(tmp_path)
    parallel, workers = _headless(folder, monkeypatch, workers=True)
    serial, none = _headless(folder, monkeypatch, workers=False)
    assert workers is not None and none is None
    assert _per_rank(parallel) == _per_rank(serial)
    assert len(parallel.splitlines()) == len(serial.splitlines())
    sort = orjson.OPT_SORT_KEYS
    assert sorted(orjson.dumps(a, option=sort) for a in _alerts(parallel)) == sorted(
        orjson.dumps(a, option=sort) for a in _alerts(serial)
    )
    records = _records(parallel)
    where = {
        (r["run"], r["rank"], r["step"]): index
        for index, r in enumerate(records)
        if r["kind"] == "metrics"
    }
    alerts = {
        (r["run"], r["step"], r["metric"]): (i, r)
        for i, r in enumerate(records)
        if r["kind"] == "alert"
    }
    for index, alert in alerts.values():
        assert all(where[(alert["run"], rank, alert["step"])] < index for rank in alert["ranks"])
    for step, metric in ((600, "grad_norm"), (900, "loss"), (1300, "loss")):
        index, alert = alerts[("big", step, metric)]
        assert alert["ranks"] == [0, 1, 2, 3]
        assert index < where[("big", 0, 1599)]  # told while the history goes on
    assert ("small", 150, "grad_norm") in alerts
    # Each rank read to its end by its worker, in many chunks.
    for (key, rank), offset in workers.read.items():
        assert offset == (Path(key) / f"rank-{rank}.jsonl").stat().st_size
    big = [chunks for (key, _), chunks in workers._index.items() if Path(key).name == "big"]
    assert len(big) == 4 and all(len(chunks) > 5 for chunks in big)


def test_workers_write_the_serial_snapshots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A critical alert's snapshot (every rank's metrics 50 steps around the NaN), read again
    from the files after the history is out: the serial path's alert and lines, and the lines
    a poll reading far past the alert pushed out of its 200-message window."""
    shutil.copytree(_history(tmp_path / "a"), tmp_path / "b")
    _headless(tmp_path / "a", monkeypatch, workers=True, snapshots=True)
    _headless(tmp_path / "b", monkeypatch, workers=False, snapshots=True)
    parallel = sorted((tmp_path / "a" / "big" / "alerts").iterdir())
    serial = sorted((tmp_path / "b" / "big" / "alerts").iterdir())
    assert (
        [p.name for p in parallel] == [p.name for p in serial] == ["nonfinite-rank0-step1300.jsonl"]
    )
    near = [
        line
        for rank in range(4)
        for line in (tmp_path / "a" / "big" / f"rank-{rank}.jsonl").read_bytes().splitlines()
        if b'"kind":"metrics"' in line and 1250 <= orjson.loads(line)["step"] <= 1350
    ]
    assert len(near) > 4 * 101  # and rank 0's evaluations
    lines = parallel[0].read_bytes().splitlines()
    assert sorted(lines[1:]) == sorted(near)  # after the alert's own record
    told = serial[0].read_bytes().splitlines()
    assert lines[0].replace(b"/a/big", b"/b/big") == told[0]
    assert set(told[1:]) < set(lines[1:])


def test_a_lone_rank_is_read_on_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One rank file is read in order by one process: a worker would only add a fork."""
    write_run(tmp_path, "solo", ranks=1, steps=300, extra={200: {"loss": math.nan}})
    output, workers = _headless(tmp_path, monkeypatch, workers=True)
    assert workers is None and output.endswith(b'"kind":"end","step":299,"status":"ok"}\n')


def test_a_run_still_written_is_read_on_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank file without its end message may grow while it is read: no workers."""
    folder = _history(tmp_path, ended=False)
    _, workers = _headless(folder, monkeypatch, workers=True)
    assert workers is None


@pytest.mark.parametrize("after", [0, 5])
def test_a_worker_that_dies_stops_the_alerts_with_a_note_not_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """Killed (an OOM killer, say) before it sent anything or after a few chunks: every
    message is still printed once, in per-rank order (the rest of its ranks read here), the
    alerts stop with one critical 'internal' notice, and nothing waits for ever."""
    folder = _history(tmp_path)
    serial, _ = _headless(folder, monkeypatch, workers=False)
    # The NaN the lost worker would have judged is not there to make the exit status 2: the
    # notice itself is critical, so a script still sees the history was not judged whole.
    output, _ = _headless(folder, monkeypatch, workers=True, kill=(0, after), status=2)
    assert _per_rank(output) == _per_rank(serial)
    internal = [r for r in _alerts(output) if r["type"] == "internal"]
    assert len(internal) == 1 and "history worker" in internal[0]["message"]
    assert internal[0]["severity"] == "critical"


class _Broken(AlertEngine):
    """An engine with a bug of lmtop's at step 700."""

    def _feed(self, key: str, message: schema.Message) -> list[Alert]:
        if message.step == 700:
            raise ValueError("boom")
        return super()._feed(key, message)


def test_an_error_in_a_workers_engine_is_lmtops_not_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the alert engine, met in a worker: the alerts stop with the serial path's
    warning (not a critical notice: the run is not to blame), the output goes on whole."""
    folder = _history(tmp_path)
    serial, _ = _headless(folder, monkeypatch, workers=False)
    monkeypatch.setattr(history_workers, "_forks", lambda: True)  # the engine below, inherited
    monkeypatch.setattr(history_workers, "AlertEngine", _Broken)
    output, _ = _headless(folder, monkeypatch, workers=True, status=0)
    assert _per_rank(output) == _per_rank(serial)
    [internal] = [a for a in _alerts(output) if a["type"] == "internal"]
    assert internal["severity"] == "warning" and "ValueError: boom" in internal["message"]
    assert not [a for a in _alerts(output) if a["step"] is not None and a["step"] >= 700]


def _garbage_first(run_dir: Path, rank: int, lines: int = 400) -> None:
    """Puts ``lines`` lines that are no messages after the rank's start: its first 32 KB hold
    no step."""
    path = run_dir / f"rank-{rank}.jsonl"
    first, rest = path.read_bytes().split(b"\n", 1)
    path.write_bytes(first + b"\n" + (b"x" * 99 + b"\n") * lines + rest)


def _poke(run_dir: Path, rank: int, step: int, **values: Any) -> None:
    """Sets metrics of the rank's line at ``step`` (NaN as the hook writes it)."""
    path = run_dir / f"rank-{rank}.jsonl"
    lines = path.read_bytes().split(b"\n")
    for index, raw in enumerate(lines):
        if raw and b'"kind":"metrics"' in raw and orjson.loads(raw)["step"] == step:
            record = orjson.loads(raw)
            record["m"].update({k: schema.finite_or_token(v) for k, v in values.items()})
            lines[index] = orjson.dumps(record)
            break
    path.write_bytes(b"\n".join(lines))


def test_a_worker_lost_leaves_the_alerts_judged_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN on rank 0 waits for ranks 1 and 3 to go past its step; their worker dies first:
    the NaN is still told (it was judged), then the notice."""
    folder = tmp_path / "runs"
    write_run(folder, "big", ranks=4, steps=400, eval_every=0)
    _poke(folder / "big", 0, 10, loss=math.nan)
    for rank in (1, 3):  # the second worker's ranks: no step in their first chunk
        _garbage_first(folder / "big", rank)
    serial, _ = _headless(folder, monkeypatch, workers=False)
    output, workers = _headless(folder, monkeypatch, workers=True, kill=(1, 0))
    assert [g for g in workers._groups[1]] and {n for _, n in workers._groups[1]} == {1, 3}
    assert _per_rank(output) == _per_rank(serial)
    [nan] = [a for a in _alerts(serial) if a["type"] == "nonfinite"]
    told = _alerts(output)
    assert [a["type"] for a in told] == ["nonfinite", "internal"] and told[0] == nan


def test_a_worker_lost_with_alerts_off_is_a_note_not_an_alert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--no-alerts``: nothing goes unjudged when a worker is lost, so no alert, exit 0."""
    folder = _history(tmp_path)
    serial, _ = _headless(folder, monkeypatch, workers=False, alerts=False, status=0)
    output, workers = _headless(
        folder, monkeypatch, workers=True, alerts=False, status=0, kill=(0, 0)
    )
    assert (workers is not None and output == serial) or _per_rank(output) == _per_rank(serial)
    assert not _alerts(output)
    assert "history worker stopped" in capsys.readouterr().err


def test_workers_report_bad_lines_gaps_and_other_protocols(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the workers' reads found wrong is said on stderr as the serial path says it: bad
    lines, messages missing, a line of another protocol version, far past the first poll."""
    folder = _history(tmp_path)
    path = folder / "big" / "rank-2.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[-10:-10] = [b"not json", b'{"v":99,"run":"big","rank":2}']
    del lines[900]  # a message missing
    path.write_bytes(b"\n".join(lines))
    capsys.readouterr()
    _headless(folder, monkeypatch, workers=False)
    serial = capsys.readouterr().err
    _headless(folder, monkeypatch, workers=True)
    parallel = capsys.readouterr().err
    assert parallel == serial
    assert "2 bad lines skipped; 1 messages missing; protocol v99 is not supported" in serial


def _resumed(folder: Path, ranks: int = 4) -> Path:
    """A run resumed from a checkpoint in the same files: steps 0-1199, then a new start and
    steps 600-1399 again, with a NaN at step 1000 of the second go on every rank."""
    run_dir = folder / "resumed"
    run_dir.mkdir(parents=True)
    for rank in range(ranks):
        seq, lines = 0, []
        info = {"host": "gpu-box", "pid": 999_999_999, "rank": rank, "config": {}}
        for first, last in ((0, 1200), (600, 1400)):
            lines.append(make_line("resumed", rank, ranks, seq, "start", None, T0, info=info))
            seq += 1
            for step in range(first, last):
                metrics = curve(step, 1400, rank)
                if first and step == 1000:
                    metrics["loss"] = math.nan
                lines.append(
                    make_line("resumed", rank, ranks, seq, "metrics", step, T0 + step, m=metrics)
                )
                seq += 1
        lines.append(make_line("resumed", rank, ranks, seq, "end", 1399, T0 + 1400, status="ok"))
        (run_dir / f"rank-{rank}.jsonl").write_bytes(b"".join(lines))
    return folder


def test_a_resumed_run_names_every_rank_of_its_replayed_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps going back after a new start: an event of the second go waits for every rank's
    second go, as it does on one process."""
    folder = _resumed(tmp_path)
    serial, _ = _headless(folder, monkeypatch, workers=False)
    parallel, workers = _headless(folder, monkeypatch, workers=True)
    assert workers is not None and _per_rank(parallel) == _per_rank(serial)
    sort = orjson.OPT_SORT_KEYS
    assert sorted(orjson.dumps(a, option=sort) for a in _alerts(parallel)) == sorted(
        orjson.dumps(a, option=sort) for a in _alerts(serial)
    )
    assert any(a["step"] == 1000 and a["ranks"] == [0, 1, 2, 3] for a in _alerts(parallel))


Script = list[tuple[str, int | None, dict[str, Any]]]  # (kind, step, fields) a line


def _two_ranks(folder: Path, script: Any) -> Path:
    """A finished 2-rank run, each rank's lines ``script(rank)`` in order (seq counted here).
    Rank 1 writes longer metrics lines, so its chunks end at other steps than rank 0's."""
    run_dir = folder / "two"
    run_dir.mkdir(parents=True)
    for rank in range(2):
        lines = []
        for seq, (kind, step, fields) in enumerate(script(rank)):
            if kind == "metrics" and rank == 1 and "loss" in fields["m"]:
                fields = {"m": {**fields["m"], "a_metric_with_a_long_name_on_rank_one": 1.0}}
            lines.append(make_line("two", rank, 2, seq, kind, step, T0 + (step or 0), **fields))
        (run_dir / f"rank-{rank}.jsonl").write_bytes(b"".join(lines))
    return folder


def _go(first: int, last: int, nan_at: int | None = None) -> Script:
    info = {"host": "gpu-box", "pid": 999_999_999, "config": {}}
    out: Script = [("start", None, {"info": info})]
    for step in range(first, last):
        metrics = curve(step, 1400)
        if step == nan_at:
            metrics["loss"] = math.nan
        out.append(("metrics", step, {"m": metrics}))
    return out


def _compare_alerts(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    serial, _ = _headless(folder, monkeypatch, workers=False)
    parallel, workers = _headless(folder, monkeypatch, workers=True)
    assert workers is not None and _per_rank(parallel) == _per_rank(serial)
    told = [(a["type"], a["step"], a["ranks"]) for a in _alerts(parallel)]
    assert told == [(a["type"], a["step"], a["ranks"]) for a in _alerts(serial)]
    return told


def test_an_evaluation_logged_at_an_earlier_step_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank logs its evaluation of step 900 after its training step 999: its NaN is
    told naming both ranks, though a rank's chunk may end past step 1000 before it."""

    def script(rank: int) -> Script:
        lines = _go(0, 1200)
        lines.insert(1001, ("metrics", 900, {"m": {"eval_loss": math.nan}}))  # after step 999
        return [*lines, ("end", 1199, {"status": "ok"})]

    assert ("nonfinite", 900, [0, 1]) in _compare_alerts(_two_ranks(tmp_path, script), monkeypatch)


def test_a_chunk_ending_after_a_new_start_holds_the_replayed_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed (steps 990-1099 after 0-1199), rank 1 loading shards for 300 lines after its
    new start: a chunk ends there, before any step of the new go; the NaN at 1000 of the new
    go still names both ranks."""

    def script(rank: int) -> Script:
        resumed = _go(990, 1100, nan_at=1000)
        shards = [("event", None, {"text": f"loading shard {i}" + "." * 80}) for i in range(300)]
        loading = shards if rank == 1 else []
        return [*_go(0, 1200), resumed[0], *loading, *resumed[1:], ("end", 1099, {"status": "ok"})]

    told = _compare_alerts(_two_ranks(tmp_path, script), monkeypatch)
    assert ("nonfinite", 1000, [0, 1]) in told


def test_the_snapshot_of_a_resumed_run_holds_the_go_its_alert_was_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NaN at step 1000 of a run's second go (steps 600-1399 again after 0-1199): its
    snapshot holds that go's lines of steps 950-1050, once each, not the first go's too."""
    folder = _resumed(tmp_path)
    _headless(folder, monkeypatch, workers=True, snapshots=True)
    path = folder / "resumed" / "alerts" / "nonfinite-rank0-step1000.jsonl"
    records = [orjson.loads(raw) for raw in path.read_bytes().splitlines()[1:]]
    rank0 = [r for r in records if r["rank"] == 0]
    assert sorted(r["step"] for r in rank0) == list(range(950, 1051))
    assert {r["rank"] for r in records} == {0, 1, 2, 3}
    second = [r for r in rank0 if r["step"] == 1000]
    assert second[0]["m"]["loss"] == "NaN"  # the second go's line, not the first's


class _Interrupted(io.BytesIO):
    """A reader that stops (Ctrl-C) once it has seen a NaN's alert."""

    def write(self, data: Any) -> int:
        if b'"type":"nonfinite"' in self.getvalue():
            raise KeyboardInterrupt
        return super().write(data)


def test_snapshots_of_alerts_told_are_written_when_the_output_stops_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or ``| head``) after the NaN's alert: its snapshot is still written."""
    folder = _history(tmp_path)
    monkeypatch.setattr(history_workers, "MIN_BYTES", 0)
    monkeypatch.setattr(history_workers, "CHUNK_BYTES", 32 << 10)
    monkeypatch.setattr(history_workers, "cores", lambda: 2)
    out = _Interrupted()
    status = headless.run([str(folder)], follow=False, out=out, settings=AlertSettings())
    assert status == 130
    assert [p.name for p in (folder / "big" / "alerts").iterdir()] == [
        "nonfinite-rank0-step1300.jsonl"
    ]


def test_workers_of_a_viewer_killed_let_its_pipeline_end(tmp_path: Path) -> None:
    """``lmtop --headless --no-follow RUN | jq`` with lmtop killed (SIGKILL): its workers,
    forked, hold neither its standard output nor their own pipes, so they end and ``jq``
    sees the end of its input, instead of waiting for ever."""
    folder = _history(tmp_path)
    code = (
        "import sys; from lmtop.tui import cli, history_workers as w; "
        "w.MIN_BYTES = 0; w.CHUNK_BYTES = 4096; w.cores = lambda: 2; "
        f"sys.argv = ['lmtop', '--headless', '--no-follow', {str(folder)!r}]; cli.main()"
    )
    viewer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert viewer.stdout is not None
    viewer.stdout.readline()  # it prints: its workers are at work, their pipes full
    viewer.kill()
    viewer.wait()
    ended = time.monotonic() + 20.0
    while time.monotonic() < ended:
        if select.select([viewer.stdout], [], [], 0.5)[0] and not viewer.stdout.read1(1 << 16):
            break  # the end of the pipe: nobody holds it any more
    else:
        pytest.fail("the viewer's workers still hold its standard output")


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
    assert not history_workers._finished(run, 0)
    assert not history_workers._finished(run, 1)


def test_workers_that_cannot_start_leave_the_alerts_to_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process or file limit (EAGAIN, EMFILE on a shared box): the serial output, no error."""
    folder = _history(tmp_path)
    serial, _ = _headless(folder, monkeypatch, workers=False)

    real = history_workers.get_context("spawn")
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

    monkeypatch.setattr(history_workers, "get_context", lambda method: Limited())
    output, workers = _headless(folder, monkeypatch, workers=True)
    assert workers is None and output == serial
    assert len(opened) == 4 and all(end.closed for end in opened)  # no pipe left open


def test_a_single_threaded_viewer_on_linux_forks_its_workers() -> None:
    """What ``lmtop --headless --no-follow`` runs as: one thread, so workers are forked."""
    code = "from lmtop.tui import history_workers; print(history_workers._forks())"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(sys.platform == "linux")


def _spike(rank: int, step: int, value: float) -> Alert:
    return Alert(type="spike", severity="warning", run="r", key="/runs/r", rank=rank,
                 metric="loss", step=step, value=value, baseline=1.0, message="loss spike")  # fmt: skip


def test_an_event_is_told_once_every_rank_of_its_run_went_past_it() -> None:
    """Ranks read apart: an event waits while a rank may still raise it (at or before its
    step), then is one alert naming every rank, in the lowest rank's words; never again. A
    rank resumed in the same file (a new start message) is behind its replayed steps."""
    merge = OnceByStep({"/runs/r": [0, 1]})
    merge.add(_spike(1, 10, 9.0), 1)
    merge.advance("/runs/r", 1, (1, 12))
    assert merge.take() == []  # rank 0 has not been read that far
    merge.advance("/runs/r", 0, (1, 10))
    assert merge.take() == []  # rank 0 is at step 10: its own spike may be in its next line
    merge.add(_spike(0, 10, 8.0), 1)
    merge.advance("/runs/r", 0, (1, 11))
    [(told, generation)] = merge.take()
    assert generation == 1 and told.ranks == (0, 1) and told.rank == 0 and told.value == 8.0
    assert told.message == "loss spike (ranks 0-1)"
    merge.add(_spike(1, 10, 9.0), 1)  # the same event again: told already
    assert merge.take() == []
    # Both resumed from step 5 (generation 2); rank 0 got past step 8 first.
    merge.advance("/runs/r", 0, (2, 20))
    merge.add(_spike(0, 8, 9.0), 2)
    assert merge.take() == []  # rank 1 was at step 12, but of the run before the resume
    merge.advance("/runs/r", 1, (2, 9))
    assert [(a.step, g) for a, g in merge.take()] == [(8, 2)]
    merge.add(_spike(1, 30, 9.0), 2)
    assert merge.take() == []
    assert [a.step for a, _ in merge.rest()] == [30]  # the history ended: what is held is told
