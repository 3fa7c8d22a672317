"""The viewer's state has one owner and a run is its directory: the findings of issue 11.

Each test here failed before the redesign: a freeze under critical alerts, two runs of one name
merged, the clipping line missing under accelerate's config name, the ranks table judging
stragglers and silence by rules of its own, steps that went back, and a screen that only moved
on a key press.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SCRIPTS, launch
from lmtop.hooks import schema
from lmtop.tui import frame
from lmtop.tui.alert_actions import Alerting
from lmtop.tui.alert_settings import AlertSettings, StallSettings, StragglerSettings
from lmtop.tui.alerts import AlertEngine
from lmtop.tui.app import LmtopApp
from lmtop.tui.charts import DEFAULT_CHARTS, ViewOptions, picture
from lmtop.tui.cli import _parser
from lmtop.tui.follow import Follower
from lmtop.tui.runbook import RunBook
from lmtop.tui.store import Store
from lmtop.tui.widgets import Header
from runs import T0, line, write_run
from test_app import shows

NAN: float = schema.finite_or_token(math.nan)  # type: ignore[assignment]  # as on the wire


def read(follower: Follower) -> list[tuple[str, schema.Message]]:
    out = follower.poll(0)
    while follower.catching_up:
        out += follower.poll(0)
    return out


# -- 1. no deadlock between the worker and the screen -------------------------------------------


def test_critical_alerts_on_every_message_while_redrawing_and_exporting_do_not_freeze_the_app(
    tmp_path: Path,
) -> None:
    # A NaN in a new metric at every step: a critical alert on every message, raised in the
    # worker while the screen redraws and exports, four openings over. The old app (the worker
    # held the screen's lock across call_from_thread(bell)) hung in 5 of 5 such runs.
    extra = {step: {f"nan_{step}": NAN} for step in range(600)}
    run_dir = write_run(tmp_path / "runs", name="nan-test", ranks=1, steps=600, extra=extra)
    out = tmp_path / "out"
    out.mkdir()
    try:
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / "app_under_alerts.py"), str(run_dir), str(out), "4"],
            capture_output=True,
            timeout=120,
            env=dict(os.environ, TEXTUAL="", NO_COLOR="1"),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the app froze while critical alerts arrived")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    words = done.stdout.decode().split()
    alerts, critical, exported = int(words[1]), int(words[3]), int(words[5])
    assert critical >= 500 and alerts >= critical and exported >= 2
    assert list(out.glob("*.csv")) or list(run_dir.glob("lmtop-*.csv"))


async def test_a_finished_run_holding_a_nan_opens_with_its_alert_and_quits(
    tmp_path: Path,
) -> None:
    run_dir = write_run(
        tmp_path / "runs", name="nan-test", ranks=2, steps=300, extra={150: {"loss": NAN}}
    )
    source = Follower([str(run_dir)], follow=False, live=False)
    app = LmtopApp(source, refresh_hz=20, alerts=Alerting(AlertSettings(), source.runs))
    async with app.run_test(size=(160, 48)) as pilot:
        deadline = time.monotonic() + 20
        while not app.alerts and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.pause(0.2)
        header = str(app.query_one(Header).render())
        # The NaN of step 150 on both ranks is one event: one critical alert naming the ranks.
        assert "nan-test" in header and "finished" in header and "⚠ 1 alert " in header
        nans = [a for a in app.alerts if a.type == "nonfinite"]
        assert [(a.rank, a.ranks, a.step, a.severity) for a in nans] == [
            (0, (0, 1), 150, "critical")
        ]
        assert nans[0].message.endswith("(ranks 0-1)")
        await pilot.press("q")
    assert not app.is_running


# -- 2. a run is its directory -------------------------------------------------------------------


def test_runs_with_one_name_in_two_folders_stay_two_runs(tmp_path: Path) -> None:
    first = write_run(tmp_path / "project-a", name="sft", ranks=1, steps=100)
    second = write_run(
        tmp_path / "project-b", name="sft", ranks=1, steps=50, extra={20: {"loss": 50.0}}
    )
    follower = Follower([str(first), str(second)], follow=False, live=False)
    batch = read(follower)
    store = Store()
    store.add(batch)
    engine = AlertEngine()
    alerts = [a for key, m in batch for a in engine.feed(key, m)]
    keys = {str(first.resolve()), str(second.resolve())}
    assert set(follower.runs) == keys
    assert {run.name for run in follower.book.snapshot()} == {"sft"}
    for key, steps in ((str(first.resolve()), 100), (str(second.resolve()), 50)):
        loss = store.get(key, 0, "loss")
        assert loss is not None and list(loss.steps) == list(range(steps))
    assert {(a.key, a.step) for a in alerts if a.type == "spike"} == {(str(second.resolve()), 20)}


@pytest.mark.slow
def test_live_frames_of_two_runs_with_one_name_are_routed_to_their_own_run(
    tmp_path: Path, lmtop_env: dict[str, str]
) -> None:
    # Two jobs named sft in two projects, live at the same time: a viewer of this user's live
    # runs must give each its own messages, exactly once (the old viewer routed frames by name).
    steps = 3000
    follower = Follower()  # this user's live runs, over the registry and the live sockets
    got: list[tuple[str, schema.Message]] = []
    jobs = [
        launch(
            "publish_steps.py",
            str(steps),
            "--metrics",
            str(metrics),
            "--pace-every",
            "10",
            "--pace",
            "0.01",
            LMTOP_RUN="sft",
            LMTOP_DIR=str(tmp_path / project),
        )
        for project, metrics in (("a", 3), ("b", 5))
    ]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        all(j.poll() is not None for j in jobs) and follower.done
    ):
        got += follower.poll(0.05)
    follower.close()
    for job in jobs:
        assert job.wait() == 0
    by_key: dict[str, list[schema.Message]] = {}
    for key, message in got:
        by_key.setdefault(key, []).append(message)
    assert set(by_key) == {
        str((tmp_path / "a" / "sft").resolve()),
        str((tmp_path / "b" / "sft").resolve()),
    }
    for key, messages in by_key.items():
        width = 3 if "/a/" in key else 5
        assert [m.seq for m in messages] == list(range(steps + 2)), key
        assert all(len(m.m) == width for m in messages if m.kind == "metrics"), key


# -- 5. a run that starts and ends between two scans is still seen -----------------------------


@pytest.mark.slow
def test_a_viewer_started_before_a_short_run_sees_all_of_it(lmtop_env: dict[str, str]) -> None:
    # 3000 steps back to back end in a fraction of a second: between two scans of the registry.
    # The hook leaves its entry marked ended for a minute, so the viewer still finds the run.
    follower = Follower()  # this user's live runs, as `lmtop` with no path
    assert follower.poll(0) == []
    job = launch("publish_steps.py", "3000", "--pace-every", "0")
    assert job.wait(timeout=60) == 0
    got: list[schema.Message] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (got and follower.done):
        got += [m for _, m in follower.poll(0.05)]
    follower.close()
    assert [m.seq for m in got] == list(range(3002))


# -- 6. one vocabulary: accelerate's clipping name draws the clipping line ---------------------


@pytest.mark.parametrize("key", ["max_grad_norm", "gradient_clipping", "gradient_clip_val"])
def test_every_clipping_config_name_draws_the_line_and_the_share(key: str) -> None:
    store = Store()
    messages = [
        (
            "k",
            schema.decode(
                line("r", rank, 2, step + 1, "metrics", step, T0 + step, m={"grad_norm": norm})
            ),
        )
        for step, norm in enumerate([0.5, 2.0, 0.5, 3.0])
        for rank in (0, 1)
    ]
    store.add(messages)
    spec = next(s for s in DEFAULT_CHARTS if s.key == "grad_norm")
    pic = picture(store, "k", spec, ViewOptions(), 40, {key: 1.0})
    assert pic.hlines == [(1.0, "clip")]
    # Two ranks publish the same all-reduced norm: 2 of 4 optimizer steps, not of 8 rank-steps.
    assert pic.note == "clipped 50% of last 4 steps"


# -- 7. the ranks table and the alerts judge ranks by the same rules and settings ------------


def _book(stall: StallSettings, straggler: StragglerSettings) -> tuple[RunBook, object]:
    book = RunBook(stall, straggler)
    run = book.run("k", "r", None)
    for rank, seconds in ((0, 1.0), (1, 1.0), (2, 2.2)):  # rank 2 takes 2.2x as long a step
        state = book.rank(run, rank)
        for step in range(60):
            message = schema.decode(
                line("r", rank, 3, step, "metrics", step, T0 + seconds * step, m={"loss": 1.0})
            )
            book.apply(run, state, message)
    return book, run


def test_the_tables_straggler_follows_the_straggler_settings() -> None:
    for ratio, expected in ((1.5, "straggler"), (3.0, "live")):
        book, _ = _book(StallSettings(), StragglerSettings(ratio=ratio, rearm_ratio=ratio - 0.2))
        episodes = book.health(time.monotonic())
        (run,) = book.snapshot()
        rows = frame.rank_rows(Store(), run, T0 + 100)
        assert [r.state for r in rows] == ["live", "live", expected]
        assert [e.rank for e in episodes] == ([2] if expected == "straggler" else [])


def test_silence_follows_the_stall_settings_in_the_table_the_header_and_the_alert() -> None:
    stall = StallSettings(min_seconds=5.0, intervals=1.0)
    book, run = _book(stall, StragglerSettings())
    now = time.monotonic()
    run.ranks[1].last_seen = now - 6  # type: ignore[attr-defined]
    engine = AlertEngine(AlertSettings(stall=stall))
    alerts = engine.tick(book.health(now))
    (view,) = book.snapshot(now)
    assert [r.health for r in view.ranks] == ["live", "silent", "straggler"]
    assert [(a.type, a.rank) for a in alerts] == [("stall", 1), ("straggler", 2)]
    assert view.state == "live"  # others still progress
    for state in run.ranks.values():  # type: ignore[attr-defined]
        state.last_seen = now - 6
    (view,) = book.snapshot(now)
    assert view.state == "stalled" and {r.health for r in view.ranks} == {"silent"}


def test_a_run_whose_files_are_still_being_read_is_reading_not_live() -> None:
    """Opened the next morning, a finished run is "live" in the run book until its ranks' end
    messages are read: the header says it is being read, with its own duration, not the time
    since it started, and no ETA."""
    from lmtop.tui import numbers

    book = RunBook(StallSettings(), StragglerSettings())
    run = book.run("k", "r", None)
    rank = book.rank(run, 0)
    book.apply(run, rank, schema.decode(line("r", 0, 1, 0, "start", None, T0, info={})))
    for step in range(60):
        message = line("r", 0, 1, step + 1, "metrics", step, T0 + 2.0 * (step + 1), m={"x": 1.0})
        book.apply(run, rank, schema.decode(message))
    (view,) = book.snapshot()
    assert view.state == "live"
    next_morning = T0 + 9 * 3600
    reading = frame.header_text(Store(), view, 1, next_morning, {"reading": True}).plain
    assert " reading " in reading and " live " not in reading
    assert f"  {numbers.duration(120.0)}  " in reading  # its 60 steps of 2 s, not 9 h
    read = frame.header_text(Store(), view, 1, next_morning, {}).plain
    assert " live " in read and f"  {numbers.duration(9 * 3600.0)}  " in read
    # Hundreds of live ranks outgrowing a poll's read: catching up, but their news is recent.
    busy = frame.header_text(Store(), view, 1, T0 + 130, {"reading": True}).plain
    assert " live " in busy


# -- 8. steps that go back, and an honest help line --------------------------------------------


def test_steps_that_go_back_are_dropped_and_counted_and_the_pyramid_stays_sorted() -> None:
    store = Store()
    epochs = [
        ("k", schema.decode(line("r", 0, 1, s, "metrics", s, T0 + s, m={"loss": 9.0})))
        for s in range(3)
    ]
    steps = [
        (
            "k",
            schema.decode(
                line("r", 0, 1, 3 + s, "metrics", s, T0 + 3 + s, m={"loss": 1.0 + s % 7})
            ),
        )
        for s in range(5000)
    ]
    store.add(epochs + steps)
    series = store.get("k", 0, "loss")
    assert series is not None
    assert list(series.steps) == sorted(series.steps)
    assert store.backwards["k"] == 2  # global steps 0 and 1 came after epoch step 2
    cols = series.columns(0, 4999, 50)
    assert max(cols.high) == 9.0 and min(cols.low) == 1.0  # every point lands in a column


def test_the_spike_threshold_help_states_the_real_default() -> None:
    text = _parser().format_help()
    default = AlertSettings().spike.tail_threshold  # what --spike-threshold sets
    assert f"spike.tail_threshold; default {default:g}" in " ".join(text.split())


# -- 9. time drives the picture ------------------------------------------------------------------


@pytest.mark.slow
async def test_a_job_going_silent_then_dying_shows_with_no_key_press(
    tmp_path: Path, lmtop_env: dict[str, str]
) -> None:
    # 200 steps, then the job hangs (sleeps) without a word: a stalled job, then a dead one.
    job = launch("publish_steps.py", "200", "--pace-every", "0", "--sleep-after", "120")
    try:
        assert job.stdout is not None
        while job.stdout.readline().strip() != b"199":
            await asyncio.sleep(0)
        settings = AlertSettings(stall=StallSettings(min_seconds=2.0, intervals=1.0))
        source = Follower(stall=settings.stall, straggler=settings.straggler)
        app = LmtopApp(source, refresh_hz=4, alerts=Alerting(settings, source.runs))
        async with app.run_test(size=(160, 48)) as pilot:
            header = app.query_one(Header)
            first = await shows(pilot, header, "step 199", every=0.1)
            await pilot.pause(1.5)  # no key pressed
            later = str(header.render())
            assert first != later, "the clock must move without data or keys"
            deadline = time.monotonic() + 10
            while " stalled " not in str(header.render()) and time.monotonic() < deadline:
                await pilot.pause(0.1)
            assert " stalled " in str(header.render())
            os.kill(job.pid, signal.SIGKILL)
            job.wait()
            deadline = time.monotonic() + 10
            while " crashed " not in str(header.render()) and time.monotonic() < deadline:
                await pilot.pause(0.1)
            assert " crashed " in str(header.render())
            rows = app.query_one("#ranks")
            assert "crashed" in str(rows.get_row_at(0)[-1])  # type: ignore[attr-defined]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_config_given_in_an_event_is_the_runs_config(tmp_path: Path) -> None:
    # accelerate's tracker records its config as an event when the script started the run
    # itself: the clipping threshold it names draws the clip line all the same.
    run_dir = tmp_path / "acc"
    run_dir.mkdir()
    lines = [
        line("acc", 0, 1, 0, "start", None, T0, info={"host": "h", "pid": 1, "config": {}}),
        line("acc", 0, 1, 1, "event", 0, T0, text="configuration",
             data={"config": {"gradient_clipping": 0.5, "lr": 1e-3}}),
        line("acc", 0, 1, 2, "metrics", 0, T0 + 1, m={"grad_norm": 0.7}),
        line("acc", 0, 1, 3, "end", 0, T0 + 2, status="ok"),
    ]  # fmt: skip
    (run_dir / "rank-0.jsonl").write_bytes(b"".join(lines))
    follower = Follower([str(run_dir)], follow=False, live=False)
    store = Store()
    while not follower.done:
        store.add(follower.poll(0))
    (run,) = follower.book.snapshot()
    assert run.config == {"gradient_clipping": 0.5, "lr": 1e-3}
    assert [e.text for e in run.events] == ["configuration"]
    pic = picture(store, run.key, DEFAULT_CHARTS[2], ViewOptions(), 40, run.config)
    assert pic.hlines == [(0.5, "clip")]
