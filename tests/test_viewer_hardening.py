"""The viewer on a shared box, against hostile or odd input: the viewer's half of issue 14."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SCRIPTS
from lmtop.hooks import schema
from lmtop.tui.follow import IDLE_SECONDS, Follower
from lmtop.tui.runbook import RunView
from lmtop.tui.store import Store
from runs import T0, line, write_run


def _snapshot(follower: Follower) -> tuple[RunView, ...]:
    while not follower.runs or follower.catching_up:
        follower.poll(0)
    return follower.book.snapshot()


def test_values_the_hook_dropped_count_in_the_runs_dropped_figure(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "runs", name="lossy", ranks=1, steps=10, ended=False)
    with (run_dir / "rank-0.jsonl").open("ab") as f:
        f.write(
            line(
                "lossy", 0, 1, 11, "end", 9, T0 + 20, status="ok",
                problems={
                    "metrics that are not numbers dropped": 7,
                    "live frames dropped (a slow viewer; it reads them from the file)": 40,
                },
            )
        )  # fmt: skip
    (run,) = _snapshot(Follower([str(run_dir)], follow=False, live=False))
    # 7 values were lost; the 40 live frames were not (the file holds them).
    assert run.dropped == 7


def test_idle_ranks_are_read_less_and_less_often_and_one_that_speaks_is_seen(
    tmp_path: Path,
) -> None:
    ranks = 200
    run_dir = write_run(
        tmp_path / "runs",
        name="idle",
        ranks=ranks,
        steps=2,
        ended=False,
        pid=os.getpid(),
        host=socket.gethostname(),
    )  # alive: followed
    follower = Follower([str(run_dir)], live=False)
    _snapshot(follower)
    reads: dict[int, int] = {}
    read = follower._read

    def counted(run, rank, out):  # type: ignore[no-untyped-def]
        reads[rank.rank] = reads.get(rank.rank, 0) + 1
        return read(run, rank, out)

    follower._read = counted  # type: ignore[method-assign]
    started = time.monotonic()
    while time.monotonic() - started < 4.0:
        follower.poll(0.05)
    # At the full pace (every 0.25 s) each rank would be read 16 times in 4 s.
    assert max(reads.values()) <= 6, max(reads.values())
    with (run_dir / "rank-7.jsonl").open("ab") as f:
        f.write(line("idle", 7, ranks, 3, "metrics", 2, T0 + 5, m={"loss": 0.5}))
    spoke = time.monotonic()
    seen: list[int] = []
    while not seen and time.monotonic() - spoke < IDLE_SECONDS + 2:
        seen = [m.rank for _, m in follower.poll(0.05)]
    assert seen == [7]
    follower.close()


def test_one_wild_seq_does_not_hide_the_rest_of_the_rank(tmp_path: Path) -> None:
    run_dir = tmp_path / "wild"
    run_dir.mkdir()
    lines = [line("wild", 0, 1, 0, "start", None, T0)]
    lines += [
        line("wild", 0, 1, s, "metrics", s - 1, T0 + s, m={"loss": 1.0}) for s in range(1, 101)
    ]
    lines.append(line("wild", 0, 1, 10**12, "metrics", 10**15, T0 + 101, m={"loss": 1.0}))
    lines += [
        line("wild", 0, 1, s, "metrics", s, T0 + s + 1, m={"loss": 1.0}) for s in range(101, 201)
    ]
    (run_dir / "rank-0.jsonl").write_bytes(b"".join(lines))
    follower = Follower([str(run_dir)], follow=False, live=False)
    store = Store()
    steps = []
    while not follower.done:
        batch = follower.poll(0)
        store.add(batch)
        steps += [m.step for _, m in batch if m.kind == "metrics"]
    (run,) = follower.book.snapshot()
    assert steps[-100:] == list(range(101, 201))  # every later message is shown
    loss = store.get(str(run_dir.resolve()), 0, "loss")  # and charted: the wild step is not
    assert loss is not None and loss.steps[-1] == 200 and not store.backwards
    assert run.bad_lines == 1 and run.dropped == 0


def test_a_real_gap_in_seq_is_counted_once_and_the_rank_goes_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "gap"
    run_dir.mkdir()
    lines = [line("gap", 0, 1, s, "metrics", s, T0 + s, m={"loss": 1.0}) for s in range(50)]
    lines += [line("gap", 0, 1, s, "metrics", s, T0 + s, m={"loss": 1.0}) for s in range(80, 120)]
    (run_dir / "rank-0.jsonl").write_bytes(b"".join(lines))
    follower = Follower([str(run_dir)], follow=False, live=False)
    (run,) = _snapshot(follower)
    assert run.dropped == 30 and run.bad_lines == 0 and run.last_step == 119


async def test_exporting_a_run_whose_path_is_rich_markup_does_not_crash(tmp_path: Path) -> None:
    from lmtop.tui.app import LmtopApp

    run_dir = write_run(tmp_path / "a[/]b" / "[bold]x[/bold]", name="run", ranks=1, steps=20)
    app = LmtopApp(Follower([str(run_dir)], follow=False, live=False), refresh_hz=20)
    async with app.run_test(size=(120, 40)) as pilot:
        while not app.store.points:
            await pilot.pause(0.05)
        await pilot.press("e")
        await pilot.pause(0.3)
        assert app.is_running
        svg, table = app.exported
    assert svg.parent == run_dir.resolve() and table.read_text().startswith("rank,metric")
    assert oct(table.stat().st_mode & 0o777) == "0o600"


def test_an_export_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    from lmtop.tui import export

    run_dir = write_run(tmp_path / "runs", name="run", ranks=1, steps=5)
    target = tmp_path / "victim.txt"
    target.write_text("mine")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (run_dir / f"lmtop-{stamp}.svg").symlink_to(target)
    (view,) = _snapshot(Follower([str(run_dir)], follow=False, live=False))
    try:
        export.export(view, "<svg/>", b"rank\n")
    except FileExistsError:
        pass  # refused: the name is taken (by the link)
    assert target.read_text() == "mine"


def test_a_seq_repeated_in_a_file_is_counted_and_the_first_one_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "dup"
    run_dir.mkdir()
    lines = [line("dup", 0, 1, s, "metrics", s, T0 + s, m={"loss": 1.0}) for s in range(50)]
    lines += [line("dup", 0, 1, s, "metrics", s, T0 + s, m={"loss": 99.0}) for s in range(25, 31)]
    lines += [line("dup", 0, 1, s, "metrics", s, T0 + s, m={"loss": 1.0}) for s in range(50, 60)]
    (run_dir / "rank-0.jsonl").write_bytes(b"".join(lines))
    follower = Follower([str(run_dir)], follow=False, live=False)
    got = []
    while not follower.done:
        got += [m for _, m in follower.poll(0)]
    (run,) = follower.book.snapshot()
    assert [m.seq for m in got] == list(range(60))
    assert all(m.m["loss"] == 1.0 for m in got)
    assert run.bad_lines == 6


def _read_with_alerts(folder: Path, steps: int, nan_step: int) -> tuple[Path, Any]:
    """A 1-rank run with a NaN loss at ``nan_step``, read whole through the alerts (not closed)."""
    from lmtop.tui.alert_actions import Alerting
    from lmtop.tui.alert_settings import AlertSettings

    nan: Any = schema.finite_or_token(float("nan"))
    run_dir = write_run(folder, name="nan", ranks=1, steps=steps, extra={nan_step: {"loss": nan}})
    follower = Follower([str(run_dir)], follow=False, live=False)
    alerting = Alerting(AlertSettings(), follower.runs)
    while not follower.done:
        alerting.feed_batch(follower.poll(0))
    return run_dir, alerting


def test_a_nan_in_a_long_history_batch_gets_its_whole_snapshot(tmp_path: Path) -> None:
    # The snapshot of a critical alert holds the 50 steps before it: read in one batch with
    # 1000 steps after it, those must not have been pushed out of the recent window first.
    run_dir, alerting = _read_with_alerts(tmp_path / "runs", 2000, 1000)
    alerting.close()
    (snapshot,) = (run_dir / "alerts").glob("nonfinite-*.jsonl")
    steps = [schema.decode(raw).step for raw in snapshot.read_bytes().splitlines()[1:]]
    assert min(steps) == 950 and max(steps) == 1050 and 1000 in steps


def test_a_snapshot_near_the_end_of_a_run_is_written_when_the_run_ends(tmp_path: Path) -> None:
    # A NaN 10 steps before the end: the 50 steps after it never come. The snapshot is written
    # when the rank's end arrives, not only when the viewer quits.
    run_dir, alerting = _read_with_alerts(tmp_path / "runs", 300, 290)
    written = list((run_dir / "alerts").glob("nonfinite-*.jsonl"))  # before close()
    alerting.close()
    assert len(written) == 1


@pytest.mark.slow
def test_a_rank_publishing_live_only_is_seen_by_a_viewer_of_live_runs(
    tmp_path: Path, lmtop_env: dict[str, str]
) -> None:
    # LMTOP_DIR cannot be written (a file stands where its folder should): the hook publishes
    # live only. The viewer keys the run by the directory it would have used and shows it.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = dict(os.environ, LMTOP_DIR=str(blocker / "runs"), PYTHONUNBUFFERED="1")
    follower = Follower()
    job = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "publish_steps.py"), "2000", "--pace-every", "10",
         "--pace", "0.01", "--sleep-after", "3"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    got: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not got or got[-1] < 1999):
            got += [m.step for _, m in follower.poll(0.05) if m.kind == "metrics"]  # type: ignore[misc]
    finally:
        job.wait(timeout=60)
        follower.close()
    assert got and got[-1] == 1999, "the live-only run is seen"
    assert list(follower.runs) == [
        str(blocker / "runs" / next(iter(follower.book.snapshot())).name)
    ]
    assert got == sorted(set(got))  # once each, in order, from where the viewer joined
