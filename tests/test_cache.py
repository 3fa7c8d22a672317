"""The columnar cache beside the run files: quick to reopen, never trusted over the run file."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmtop.hooks import registry
from lmtop.tui import follow, replay
from lmtop.tui.alert_actions import Alerting
from lmtop.tui.alert_settings import AlertSettings
from lmtop.tui.follow import Follower
from lmtop.tui.readers import Readers
from lmtop.tui.replay import HistoryAlerts
from lmtop.tui.store import Store
from runs import T0, curve, line, write_run

STEPS = 150


def _open(run_dir: Path, cache: bool = True, readers: int = 0) -> tuple[Follower, Store, int]:
    """Reads a run to its end as the app does; returns the follower, the store, and how many
    ranks were taken from their cache (or from worker processes)."""
    follower = Follower([str(run_dir)], follow=False, live=False, cache=cache, readers=readers)
    store = Store()
    restored = 0
    while not follower.done:
        batch = follower.poll(0)
        taken = follower.take_restored()
        restored += len(taken)
        store.adopt(taken)
        store.add(batch)
    return follower, store, restored


def _picture(follower: Follower, store: Store) -> list[Any]:
    """What the screen is made of: every series decimated to columns (by step and by time),
    and every rank's row of the ranks table."""
    out: list[Any] = []
    for key in sorted(store.series):
        series = store.series[key]
        out.append((key, len(series), repr(series.columns(0, 10 * STEPS, 37))))
        out.append(repr(series.columns(T0, T0 + 10 * STEPS, 23, by_time=True)))
    for run in follower.book.snapshot():
        out.append((run.name, run.state, run.world, run.dropped, run.bad_lines, run.config))
        out.append([(e.step, e.t, e.text, e.ranks, e.data) for e in run.events])
        for r in run.ranks:
            out.append((r.rank, r.status, r.last_step, r.messages, r.gaps, r.step_seconds, r.info))
    return out


@pytest.fixture
def cached_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run of 2 live ranks (no end line), opened once: its cache written."""
    monkeypatch.setattr(follow, "CACHE_BYTES", 0)  # small files are cached too
    spike = {100: {"loss": 10.0}}
    said = {40: "evaluation", 90: "checkpoint saved"}  # the run's events: kept in the cache too
    run_dir = write_run(
        tmp_path, "cached", ranks=2, steps=STEPS, ended=False, extra=spike, events=said
    )
    follower, store, restored = _open(run_dir)
    assert restored == 0 and follower.save_caches(store) == 2
    return run_dir


def _append(path: Path, steps: range) -> None:
    """More metrics lines of rank 0, continuing its sequence."""
    seq = len(path.read_bytes().splitlines()) - 1
    with path.open("ab") as f:
        for step in steps:
            seq += 1
            m = curve(step, STEPS) | ({"loss": 50.0} if step == steps[-1] else {})
            f.write(line("cached", 0, 2, seq, "metrics", step, T0 + 1 + step * 0.2, m=m))


def test_a_reopened_run_is_drawn_from_its_cache_as_from_its_files(cached_run: Path) -> None:
    """The second open takes every rank from its cache, and shows exactly what reading the
    JSON lines shows: every column's min and max, the ranks table."""
    assert sorted(p.name for p in cached_run.glob("*.cols")) == ["rank-0.cols", "rank-1.cols"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in cached_run.glob("*.cols"))
    follower, store, restored = _open(cached_run)
    assert restored == 2
    plain = _open(cached_run, cache=False)
    assert _picture(follower, store) == _picture(plain[0], plain[1])


@given(
    change=st.one_of(
        st.tuples(st.just("append"), st.integers(1, 40)),
        st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
        st.tuples(st.just("rewrite"), st.floats(0.0, 0.999)),
    )
)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_cache_is_extended_after_an_append_and_ignored_after_any_other_change(
    cached_run: Path, change: tuple[str, float]
) -> None:
    """Whatever happened to the run file since its cache was written (lines appended, the file
    cut short, a digit rewritten anywhere), the picture is the run file's; the cache is used
    (and read on from its offset) only after an append."""
    run_dir = Path(tempfile.mkdtemp(dir=cached_run.parent)) / "cached"
    shutil.copytree(cached_run, run_dir)
    try:
        path = run_dir / "rank-0.jsonl"
        data = path.read_bytes()
        kind, amount = change
        if kind == "append":
            _append(path, range(STEPS, STEPS + int(amount)))
        elif kind == "truncate":
            path.write_bytes(data[: int(amount * len(data))])
        else:
            digits = [i for i, c in enumerate(data) if 48 <= c <= 57]
            at = digits[int(amount * len(digits))]
            path.write_bytes(data[:at] + bytes([48 + (data[at] - 47) % 10]) + data[at + 1 :])
        follower, store, restored = _open(run_dir)
        plain = _open(run_dir, cache=False)
        assert _picture(follower, store) == _picture(plain[0], plain[1])
        assert restored == (2 if kind == "append" else 1)  # rank 1 did not change
    finally:
        shutil.rmtree(run_dir.parent)


def test_an_extended_cache_is_written_again_and_holds_the_new_lines(cached_run: Path) -> None:
    """After an append the cache is read on from its offset, and written again covering it."""
    _append(cached_run / "rank-0.jsonl", range(STEPS, STEPS + 100))
    follower, store, restored = _open(cached_run)
    assert restored == 2 and follower.save_caches(store) == 1  # rank 0's grew
    again = _open(cached_run)
    assert again[2] == 2
    loss = again[1].series[(str(cached_run), 0, "loss")]
    assert len(loss) == STEPS + 100 and max(loss.values) == 50.0, "the spike appended is kept"


def test_alerts_over_a_run_taken_from_its_cache_are_all_raised(cached_run: Path) -> None:
    """The engine sees the history the cache stands for (the run files are read again for it,
    after the picture), then what follows: the alerts are a plain read's."""
    _append(cached_run / "rank-0.jsonl", range(STEPS, STEPS + 30))
    follower = Follower([str(cached_run)], follow=False, live=False, cache=True)
    alerting = Alerting(AlertSettings(), follower.runs)
    history = HistoryAlerts(lambda b: [a for _, a in alerting.feed_batch(b)], follower)
    alerts: list[Any] = []
    taken = 0
    while not follower.done or history.replaying:
        batch = follower.poll(0)
        restored = follower.take_restored()
        taken += len(restored)
        alerts += history.take(batch, bool(restored))
        if history.owed:
            history.start()
        alerts += history.step()
    assert taken == 2
    plain = Follower([str(cached_run)], follow=False, live=False)
    plain_alerting = Alerting(AlertSettings(), plain.runs)
    expected = []
    while not plain.done:
        expected += [a for _, a in plain_alerting.feed_batch(plain.poll(0))]
    told = [(a.type, a.rank, a.metric, a.step) for a in alerts]
    assert told == [(a.type, a.rank, a.metric, a.step) for a in expected]
    assert ("spike", 0, "loss", 100) in told and ("spike", 0, "loss", STEPS + 29) in told


@pytest.mark.parametrize(
    "damage", ["garbage", "half", "empty", "pickle", "symlink", "directory", "foreign"]
)
def test_a_damaged_or_foreign_cache_is_ignored(
    cached_run: Path, tmp_path: Path, damage: str
) -> None:
    """A corrupt cache, one that holds a pickle (never unpickled), a link, or another user's
    file reads as no cache: the run file is read, and the picture is the run file's."""
    cache = cached_run / "rank-0.cols"
    good = cache.read_bytes()
    marker = tmp_path / "unpickled"
    if damage == "garbage":
        cache.write_bytes(os.urandom(len(good)))
    elif damage == "half":
        cache.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        cache.write_bytes(b"")
    elif damage == "pickle":
        with cache.open("wb") as f:
            np.savez(f, head=np.array([_Planted(str(marker))], dtype=object))
    elif damage == "symlink":
        elsewhere = tmp_path / "elsewhere.cols"
        elsewhere.write_bytes(good)
        cache.unlink()
        cache.symlink_to(elsewhere)
    elif damage == "directory":
        cache.unlink()
        cache.mkdir()
    elif damage == "foreign":
        if os.getuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(cache, 65534, 65534)
    follower, store, restored = _open(cached_run)
    assert restored == 1 and not marker.exists()
    plain = _open(cached_run, cache=False)
    assert _picture(follower, store) == _picture(plain[0], plain[1])


class _Planted:
    """An object that writes a file if it is ever unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_no_cache_is_written_into_a_directory_of_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared run directory (LMTOP_SHARE=group) that another user owns gets no cache."""
    if os.getuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    monkeypatch.setattr(follow, "CACHE_BYTES", 0)
    run_dir = write_run(tmp_path, "theirs", ranks=1, steps=50, ended=False)
    os.chown(run_dir, 65534, 65534)
    follower, store, _ = _open(run_dir)
    assert follower.save_caches(store) == 0
    assert not list(run_dir.glob("*.cols")) and not list(run_dir.glob(".*"))


def test_a_history_read_by_worker_processes_is_drawn_as_if_read_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank files read by worker processes (each handing back one rank's columns)
    give the picture one process reading every line gives, spikes included."""
    monkeypatch.setattr(follow, "WORKER_BYTES", 0)  # every rank file goes to a worker
    monkeypatch.setattr(follow, "CACHE_BYTES", 0)
    spikes = {40: {"loss": 30.0}, 90: {"grad_norm": math.nan}}
    run_dir = write_run(tmp_path, "workers", ranks=3, steps=STEPS, extra=spikes)
    follower, store, taken = _open(run_dir, readers=2)
    assert taken == 3 and not list(run_dir.glob("*.cols"))
    assert follower.save_caches(store) == 3, "what the workers read is cached for next time"
    plain = _open(run_dir, cache=False)
    assert _picture(follower, store) == _picture(plain[0], plain[1])
    assert max(store.series[(str(run_dir), 2, "loss")].values) == 30.0


def _waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait the follower starts (a sleep, a wait for a worker's read), from now on."""
    waits: list[float] = []
    sleep, wait = time.sleep, follow.futures.wait

    def sleeping(seconds: float) -> None:
        waits.append(seconds)
        sleep(seconds)

    def waiting(*args: Any, **kwargs: Any) -> Any:
        waits.append(args[1] if len(args) > 1 else kwargs.get("timeout", math.inf))
        return wait(*args, **kwargs)

    monkeypatch.setattr(follow.time, "sleep", sleeping)
    monkeypatch.setattr(follow.futures, "wait", waiting)
    return waits


def test_a_poll_hands_on_the_ranks_it_took_whole_without_waiting(
    cached_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank taken whole, from its cache or from a worker's read, goes to the screen with the
    poll that took it: the poll does not wait for live frames or the next worker first
    (0.1 s a rank of the first frame, the last one's included)."""
    follower = Follower([str(cached_run)], follow=True, live=False, cache=True)
    waits = _waits(monkeypatch)
    follower.poll(1.0)
    assert len(follower.take_restored()) == 2 and waits == []
    follower.close()

    monkeypatch.setattr(follow, "WORKER_BYTES", 0)  # every rank file goes to a worker
    run_dir = write_run(tmp_path, "workers", ranks=4, steps=STEPS)
    follower = Follower([str(run_dir)], follow=False, live=False, cache=True, readers=2)
    taken, deadline = 0, time.monotonic() + 30
    while taken < 4 and time.monotonic() < deadline:
        before = len(waits)
        follower.poll(1.0)
        restored = len(follower.take_restored())
        assert not restored or len(waits) == before, "the poll waited after taking a rank"
        taken += restored
    assert taken == 4
    follower.close()


_APP_WITH_WORKERS = """
import asyncio, sys
from lmtop.tui import follow, replay
from lmtop.tui.app import LmtopApp

follow.WORKER_BYTES = 0  # every rank file goes to a worker process

async def main():
    source = follow.Follower([sys.argv[1]], follow=False, live=False, cache=True, readers=1)
    app = LmtopApp(source, refresh_hz=20)
    async with app.run_test(size=(160, 48)) as pilot:
        for _ in range(300):
            if app.store.points >= int(sys.argv[2]):
                break
            await pilot.pause(0.1)
        print(app.store.points, len(source.take_restored()) + len(app.store.series))

asyncio.run(main())
"""


def test_the_app_shows_a_history_read_by_worker_processes(tmp_path: Path) -> None:
    """In a fresh process, under Textual (whose stderr has no file descriptor), the app's
    follower starts its worker processes and the history they read is in the store."""
    run_dir = write_run(tmp_path, "app", ranks=2, steps=STEPS)
    plain = _open(run_dir, cache=False)[1]
    done = subprocess.run(
        [sys.executable, "-c", _APP_WITH_WORKERS, str(run_dir), str(plain.points)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    points, series = map(int, done.stdout.split())
    assert points == plain.points and series == len(plain.series), done.stderr[-2000:]


def test_closing_the_readers_stops_a_read_under_way(tmp_path: Path) -> None:
    """Quitting the viewer while a worker reads a long rank file does not wait for the read:
    the worker gives it up (no result) and exits on its own, never killed (a worker killed
    while handing back a result left the viewer's exit waiting forever)."""
    run_dir = write_run(tmp_path, "long", ranks=1, steps=20_000)
    readers = Readers(1)
    reading = readers.submit(run_dir, 0)
    deadline = time.monotonic() + 30
    while not reading.running() and time.monotonic() < deadline:  # handed to the worker
        time.sleep(0.01)
    (pid,) = list(readers._pool._processes)  # type: ignore[union-attr]
    started = registry.process_start_ticks(pid)
    readers.close()
    assert reading.result(timeout=30) is None  # given up, not read to its end
    while registry.pid_alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not registry.pid_alive(pid, started), "the worker exits once told to stop"


_QUIT_WHILE_READING = """
import sys, time
from lmtop.tui import follow

follow.WORKER_BYTES = 0
source = follow.Follower([sys.argv[1]], follow=False, live=False, cache=True, readers=2)
started = time.monotonic()
while time.monotonic() - started < float(sys.argv[2]):
    source.poll(0.01)
source.close()
"""


@pytest.mark.parametrize("after", [0.0, 0.3, 0.8])
def test_quitting_while_workers_read_exits_at_once_and_quietly(
    tmp_path: Path, after: float
) -> None:
    """A viewer closed while its workers start or read a history exits within seconds, with
    nothing on stderr (a worker killed while handing back its result left the exit waiting
    forever; one still starting printed a traceback)."""
    run_dir = write_run(tmp_path, "long", ranks=2, steps=20_000)
    done = subprocess.run(
        [sys.executable, "-c", _QUIT_WHILE_READING, str(run_dir), str(after)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == ""


def test_events_every_rank_said_are_one_event_each_after_a_reopen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Restored rank by rank, 20 evaluations said by both ranks are far more than the merge
    # window back: still 20 events naming both ranks, as a plain read shows.
    monkeypatch.setattr(follow, "CACHE_BYTES", 0)
    said = {step: f"evaluation {step}" for step in range(5, STEPS, 7)}
    run_dir = write_run(tmp_path, "evals", ranks=2, steps=STEPS, events=said)
    follower, store, _ = _open(run_dir)
    assert follower.save_caches(store) == 2
    reopened, _, restored = _open(run_dir)
    assert restored == 2
    (run,) = reopened.book.snapshot()
    assert [(e.step, e.ranks) for e in run.events] == [(s, (0, 1)) for s in sorted(said)]
    assert len(said) == 21


def test_a_crash_this_viewer_judged_is_judged_again_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rank whose process is gone without an end line is "crashed" by the viewer's own check,
    # not by its file: its cache would make every later viewer take the verdict without the
    # check, and without the crash alert a plain read raises.
    monkeypatch.setattr(follow, "CACHE_BYTES", 0)
    here = socket.gethostname()  # a process of this machine, long gone
    run_dir = write_run(tmp_path, "gone", ranks=2, steps=STEPS, ended=False, host=here)

    def crashed(follower: Follower, store: Store) -> set[int]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            batch = follower.poll(0.05)
            store.adopt(follower.take_restored())
            store.add(batch)
            (run,) = follower.book.snapshot()
            if all(r.status for r in run.ranks):
                return {r.rank for r in run.ranks if r.status == "crashed"}
        return set()

    first, store = Follower([str(run_dir)], follow=True, live=False, cache=True), Store()
    assert crashed(first, store) == {0, 1} and store.points
    assert first.save_caches(store) == 0, "a viewer's verdict is not the file's"
    first.close()
    again = Follower([str(run_dir)], follow=True, live=False, cache=True)
    assert crashed(again, Store()) == {0, 1}
    assert [type(e).__name__ for e in again.book.health(0)] == ["Crash", "Crash"]
    again.close()


@pytest.mark.parametrize("threshold", [0, replay.REPLAY_FROM_BYTES])
def test_only_a_backlog_worth_it_is_replayed_and_the_alerts_are_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threshold: int
) -> None:
    # 2 ranks x 6,000 steps (~5 MB): read over several polls (a backlog), under the 8 MB from
    # which a history's alerts wait for a replay. Below it they are fed as read, with no second
    # read of the files (a viewer behind for a moment); at 0 bytes, replayed. The same alerts.
    monkeypatch.setattr(replay, "REPLAY_FROM_BYTES", threshold)
    spikes = {1000: {"loss": 40.0}, 5000: {"loss": 60.0}}
    run_dir = write_run(tmp_path, "backlog", ranks=2, steps=6000, extra=spikes, eval_every=0)
    follower = Follower([str(run_dir)], follow=False, live=False)
    alerting = Alerting(AlertSettings(), follower.runs)
    history = HistoryAlerts(lambda b: [a for _, a in alerting.feed_batch(b)], follower)
    alerts: list[Any] = []
    replayed = backlog = False
    while not follower.done or history.replaying:
        batch = follower.poll(0)
        backlog = backlog or follower.catching_up
        alerts += history.take(batch)
        replayed = replayed or history.replaying
        if history.owed:
            history.start()
        alerts += history.step()
    assert backlog and replayed == (threshold == 0)
    told = sorted((a.type, a.rank, a.metric, a.step) for a in alerts)
    assert ("spike", 0, "loss", 1000) in told and ("spike", 0, "loss", 5000) in told
    plain = Follower([str(run_dir)], follow=False, live=False)
    plain_alerting = Alerting(AlertSettings(), plain.runs)
    expected = []
    while not plain.done:
        expected += [a for _, a in plain_alerting.feed_batch(plain.poll(0))]
    assert told == sorted((a.type, a.rank, a.metric, a.step) for a in expected)


_VIEWER_WITH_A_READ = """
import sys, time
from lmtop.tui.readers import Readers

readers = Readers(1, int(sys.argv[2]))  # started at once: forked
reading = readers.submit(sys.argv[1], 0)
while not reading.running():
    time.sleep(0.01)
print(readers.forked, *readers._pool._processes, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("start", [0, 1])
def test_a_worker_whose_viewer_was_killed_exits(tmp_path: Path, start: int) -> None:
    """kill -9 of the viewer while a worker reads: the worker stops reading and exits (it held
    both ends of the pool's pipe and waited on it for ever, 44 MB each), spawned or forked."""
    run_dir = write_run(tmp_path, "long", ranks=1, steps=20_000)
    viewer = subprocess.Popen(
        [sys.executable, "-c", _VIEWER_WITH_A_READ, str(run_dir), str(start)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert viewer.stdout is not None
    forked, pid_text = viewer.stdout.readline().split()
    assert forked == str(start == 1 and sys.platform == "linux")
    pid = int(pid_text)
    started = registry.process_start_ticks(pid)
    viewer.kill()
    viewer.wait()
    deadline = time.monotonic() + 20
    while registry.pid_alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not registry.pid_alive(pid, started)


_THE_LMTOP_COMMAND = """
import sys
from lmtop.tui import app, cli, follow

follow.WORKER_BYTES = 0  # every rank file goes to a worker process


class Screen:  # the app, without the screen: reads the history as its poll thread does
    return_code = 0

    def __init__(self, source, **options):
        self.source = source

    def run(self):
        from lmtop.tui.store import Store

        source, store, taken, spread = self.source, Store(), 0, False
        readers = source._readers  # lent while the history is read
        forked = readers is not None and readers.forked
        size = readers._size if readers is not None else 0
        while not source.done:
            batch = source.poll(0.05)
            restored = source.take_restored()
            taken += len(restored)
            store.adopt(restored)
            store.add(batch)
            spread = spread or (source._readers is not None and source._readers._more is not None)
        print(forked, size, spread, taken, store.points, len(store.series))
        source.close()


app.LmtopApp = Screen
cli.main(sys.argv[1:])  # `lmtop RUN`, or `lmtop` alone: following
"""


@pytest.mark.parametrize("named", ["run", "folder", "nothing"])
def test_the_lmtop_command_opening_a_long_history_forks_its_readers(
    tmp_path: Path, named: str
) -> None:
    """`lmtop RUN`, `lmtop ./lmtop_runs` (a folder of runs) or `lmtop` alone (this user's live
    runs) on a long history with no cache starts its readers before it has a thread: forked,
    each starts with what the viewer imported rather than importing it again (~0.3 s of the
    first frame on 2 cores), and every rank comes back from them as one process reads it."""
    run_dir = write_run(tmp_path / "runs", "app", ranks=2, steps=STEPS)
    plain = _open(run_dir, cache=False)[1]
    paths = {"run": [str(run_dir)], "folder": [str(tmp_path / "runs")], "nothing": []}[named]
    if named == "nothing":
        _register(run_dir, "app", ranks=2)
    done = subprocess.run(
        [sys.executable, "-c", _THE_LMTOP_COMMAND, *paths],
        capture_output=True,
        text=True,
        timeout=120,
    )
    forked, size, spread, taken, points, series = done.stdout.split()
    assert forked == str(sys.platform == "linux"), done.stderr[-2000:]
    assert (size, spread) == ("2", "False"), "one forked reader a long file, none spawned"
    assert (int(taken), int(points), int(series)) == (2, plain.points, len(plain.series))


def _register(run_dir: Path, run: str, ranks: int, **fields: Any) -> None:
    """Registry entries as the hook writes them for a live run's ranks (this process standing
    for their publisher)."""
    for rank in range(ranks):
        endpoint = f"ipc://{registry.runtime_dir()}/{run}-{rank}.sock"
        entry = {"pid": os.getpid(), "run": run, "rank": rank, "dir": str(run_dir)}
        registry.register({**entry, "endpoint": endpoint, **fields}, f"{run}.{rank}")


def test_runs_the_first_count_finds_twice_are_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run reached through a link (`latest` beside the runs) is the same run: its long files
    are counted once, as the scan reads them once, and no reader is started for nothing."""
    monkeypatch.setattr(follow, "WORKER_BYTES", 0)
    run_dir = write_run(tmp_path / "runs", "x", ranks=2, steps=STEPS)
    (tmp_path / "runs" / "latest").symlink_to(run_dir)
    follower = Follower([str(tmp_path / "runs"), str(tmp_path / "runs" / "latest")], live=False)
    follower._workers = 8
    assert follower._uncached_history() == 2
    follower.close()


def test_malformed_registry_entries_do_not_stop_lmtop(tmp_path: Path) -> None:
    """Entries another lmtop version (or a hand) left in this user's registry, with a path that
    is no path, a pid past the C int or a start time that is no number: `lmtop` alone still
    opens, and follows the live run beside them."""
    run_dir = write_run(tmp_path / "runs", "app", ranks=2, steps=STEPS)
    _register(run_dir, "app", ranks=2, started=1.0)
    odd = {"run": "odd", "endpoint": "ipc://nowhere", "pid": os.getpid()}
    registry.register({**odd, "rank": 7, "dir": "/tmp/a\u0000b"}, "odd.7")
    registry.register({**odd, "rank": 8, "dir": 5}, "odd.8")
    registry.register({**odd, "rank": 9, "dir": str(run_dir), "pid": 2**62}, "odd.9")
    registry.register({**odd, "rank": 10, "dir": "", "started": "x"}, "odd.10")
    plain = _open(run_dir, cache=False)[1]
    follower = Follower([], follow=True, cache=True, readers=2)
    store, deadline = Store(), time.monotonic() + 30
    try:
        while store.points < plain.points and time.monotonic() < deadline:
            batch = follower.poll(0.05)
            store.adopt(follower.take_restored())
            store.add(batch)
        keys = {run.key for run in follower.book.snapshot()}
    finally:
        follower.close()
    assert store.points == plain.points and str(run_dir) in keys


_MORE_THAN_COUNTED = """
import sys
from lmtop.tui import follow

follow.WORKER_BYTES = 0  # every rank file goes to a worker process
source = follow.Follower(sys.argv[1:], follow=False, live=False, cache=True, readers=8)
forked, spread, taken = source._readers.forked, False, 0
while not source.done:
    source.poll(0.05)
    taken += len(source.take_restored())
    readers = source._readers
    spread = spread or (readers is not None and readers._more is not None)
print(forked, spread, taken)
source.close()
"""


def test_long_files_the_forked_readers_were_not_counted_for_are_read_beside_them(
    tmp_path: Path,
) -> None:
    """A forked pool has the processes its first count asked for; long files found to need a
    read later (beside a cache that proves not theirs) are read by spawned workers beside
    them, not queued behind them."""
    counted = write_run(tmp_path, "a", ranks=1, steps=STEPS)
    stale = write_run(tmp_path, "b", ranks=4, steps=STEPS)
    for rank in range(4):
        (stale / f"rank-{rank}.cols").write_bytes(b"not a cache")
    done = subprocess.run(
        [sys.executable, "-c", _MORE_THAN_COUNTED, str(counted), str(stale)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    linux = str(sys.platform == "linux")
    assert done.stdout.split() == [linux, linux, "5"], done.stderr[-2000:]


_READERS_BESIDE_A_THREAD = """
import os, sys, threading, time
from lmtop.tui.readers import Readers

alone = Readers(2, 1)
result = alone.submit(sys.argv[1], 0).result()  # the payload (decoding it imports numpy,
alone._pool.shutdown(wait=True)  # whose OpenBLAS starts a thread); the pool's threads joined:
alone.close()  # the one below is the only other (once the joined ones are gone from /proc)
deadline = time.monotonic() + 10
while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < deadline:
    time.sleep(0.01)
threads = len(os.listdir("/proc/self/task"))
stop = threading.Event()
thread = threading.Thread(target=stop.wait)
thread.start()
beside = Readers(2, 1)
again = beside.submit(sys.argv[1], 0).result()
beside.close()
stop.set()
print(threads, alone.forked, beside.forked, result is not None and again is not None)
"""


def test_readers_started_beside_a_thread_are_spawned(tmp_path: Path) -> None:
    """A thread (the screen's, the live sockets') may hold a lock that a forked child would
    keep held for ever: readers started while one runs are spawned, and read alike."""
    run_dir = write_run(tmp_path, "t", ranks=1, steps=STEPS)
    done = subprocess.run(
        [sys.executable, "-c", _READERS_BESIDE_A_THREAD, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    linux = sys.platform == "linux"
    assert done.stdout.split() == ["1", str(linux), "False", "True"], done.stderr[-2000:]


_FORK_FAILS = """
import os, sys, time
from lmtop.tui.readers import Readers

fork, forks = os.fork, []


def second_fails():  # a process limit reached at the second worker
    if forks:
        raise BlockingIOError(11, "Resource temporarily unavailable")
    forks.append(fork())
    return forks[-1]


os.fork = second_fails
try:
    Readers(4, 2)
except OSError:
    pass
os.fork = fork
time.sleep(0.5)
alive = []
for pid in forks:
    try:
        os.kill(pid, 0)
        alive.append(pid)
    except OSError:
        pass
print(len(forks), len(alive))
"""


def test_readers_that_cannot_all_be_forked_leave_none_behind() -> None:
    """A process limit reached while the readers are forked: the viewer reads in its own
    process, and the workers already forked do not stay waiting for work for ever."""
    if sys.platform != "linux":
        pytest.skip("readers are forked on Linux only")
    done = subprocess.run(
        [sys.executable, "-c", _FORK_FAILS], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["1", "0"], done.stderr[-2000:]
