"""The Textual app, driven by its keys (Pilot) on runs built from files in a temporary directory."""

from __future__ import annotations

import asyncio
import csv
import math
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from lmtop.tui import app as app_module
from lmtop.tui.app import FramePace, LmtopApp
from lmtop.tui.follow import Follower
from lmtop.tui.screens import HelpScreen, PickScreen, TextScreen
from lmtop.tui.widgets import Chart, Header
from runs import T0, line, write_run
from textual.widgets import OptionList, Static

SIZE = (160, 48)


def app_for(*paths: Path, follow: bool = False) -> LmtopApp:
    return LmtopApp(Follower([str(p) for p in paths], follow=follow, live=False), refresh_hz=20)


async def loaded(app: LmtopApp, pilot, points: int = 1, draw: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Waits until the worker has stored the history, then draws."""
    deadline = time.monotonic() + 20
    while app.store.points < points and time.monotonic() < deadline:
        await pilot.pause(0.05)
    if draw:
        app.redraw(force=True)
    await pilot.pause()


async def shows(pilot, widget, text: str, seconds: float = 20, every: float = 0.05) -> str:  # type: ignore[no-untyped-def]
    """Waits until ``widget`` renders ``text`` (or ``seconds`` pass); returns what it renders."""
    deadline = time.monotonic() + seconds
    while text not in str(widget.render()) and time.monotonic() < deadline:
        await pilot.pause(every)
    return str(widget.render())


def visible_charts(app: LmtopApp) -> list[Chart]:
    return [c for c in app.query(Chart) if not c.has_class("hidden")]


def chart(app: LmtopApp, key: str) -> Chart:
    return app.query_one(f"#chart-{key}", Chart)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "runs", ranks=2, steps=300)


async def test_q_quits_and_the_receiving_thread_ends(run_dir: Path) -> None:
    # Textual runs thread workers in asyncio's executor (threads named asyncio_N, kept idle in
    # the pool afterwards), so the check is that the worker's loop returned: it closes the
    # source on its way out, in its own thread.
    app = app_for(run_dir, follow=True)  # following: the worker never runs out of work by itself
    closed_in: list[str] = []
    close = app.source.close

    def observed_close() -> None:
        closed_in.append(threading.current_thread().name)
        close()

    app.source.close = observed_close  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot)
        worker_threads = {t.name for t in threading.enumerate()}
        await pilot.press("q")
        await pilot.pause()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not closed_in:
        await asyncio.sleep(0.05)
    assert not app.is_running
    assert closed_in and closed_in[0] in worker_threads
    assert closed_in[0] != threading.main_thread().name


async def test_a_screen_taken_down_under_the_app_raises_nothing(run_dir: Path) -> None:
    """Its widgets removed while its timer and the workers still run (a shutdown under way:
    Textual marks the app not running, then takes the screens down, then stops the timers),
    the app draws nothing and raises nothing: the frame timer's ``query_one(Header)`` raised
    ``NoMatches`` and failed the app, seen once in sixteen benchmark runs."""
    from lmtop.tui.system import SystemView
    from lmtop.tui.widgets import SystemPanel

    app = app_for(run_dir, follow=True)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot)
        app._running = False  # what Textual's shutdown sets first (App._shutdown)
        try:
            await app.screen.query("*").remove()
            app.dirty = True
            app.post_message(app_module.Sampled(SystemView(2, None, None, None, None)))
            await pilot.pause(0.3)  # six ticks of the frame timer, the sample taken
            assert not app.query(Header) and not app.query(SystemPanel)
        finally:
            app._running = True
    assert app.return_code in (None, 0)


async def test_a_widget_gone_while_the_app_runs_is_a_fault_that_shows(run_dir: Path) -> None:
    """Outside a shutdown, a widget the frame needs that is not there (a renamed id, a layout
    change) fails the app loudly rather than freezing its header and tables unseen."""
    from textual.css.query import NoMatches

    app = app_for(run_dir, follow=True)
    with pytest.raises(NoMatches):
        async with app.run_test(size=SIZE) as pilot:
            await loaded(app, pilot)
            await app.query_one(Header).remove()
            app.dirty = True
            await pilot.pause(0.3)


async def test_following_live_the_app_collects_garbage_as_cpython_does(run_dir: Path) -> None:
    """Rare collections are for reading a history (``collector``): once it is read and the
    app follows live, its collector is as it found it (a viewer runs for days)."""
    import gc

    from lmtop.tui import collector

    usual = gc.get_threshold()
    collector.reading(True)  # as lmtop starts it
    try:
        app = app_for(run_dir, follow=True)
        async with app.run_test(size=SIZE) as pilot:
            await loaded(app, pilot)
            deadline = time.monotonic() + 20
            while gc.get_threshold() != usual and time.monotonic() < deadline:
                await pilot.pause(0.05)
            assert gc.get_threshold() == usual and not app.catching_up
    finally:
        collector.reading(False)  # the tests after this one collect as before, whatever happened


async def test_screen_shows_header_charts_and_ranks(run_dir: Path) -> None:
    app = app_for(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot)
        header = str(app.query_one(Header).render())
        assert (
            "fixed-run" in header
            and "finished" in header
            and "step 299/300" in header
            and "world 2" in header
        )
        loss = chart(app, "loss").picture
        assert loss is not None and {line.label for line in loss.lines} >= {
            "train r0",
            "train r1",
            "eval",
        }
        assert len(visible_charts(app)) == 6
        grad = chart(app, "grad_norm").picture
        assert (
            grad is not None
            and grad.hlines == [(1.0, "clip")]
            and grad.note.startswith("clipped 0%")
        )


async def test_help_and_keys_move_focus_and_zoom(run_dir: Path) -> None:
    app = app_for(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        first = app.focused
        await pilot.press("tab")
        assert isinstance(app.focused, Chart) and app.focused is not first
        await pilot.press("left")
        assert app.focused is first
        await pilot.press("right", "right")
        target = app.focused
        await pilot.press("enter")
        await pilot.pause()
        assert visible_charts(app) == [target]
        await pilot.press("enter")
        await pilot.pause()
        assert len(visible_charts(app)) == 6


async def test_smoothing_log_window_and_x_axis(run_dir: Path) -> None:
    app = app_for(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot)
        loss = chart(app, "loss")
        assert any("smoothed" in line.label for line in loss.picture.lines)  # type: ignore[union-attr]
        await pilot.press("s", "s", "s")  # 0.6 -> 0.9 -> 0.99 -> off
        assert app.options.smoothing == 0.0
        assert not any("smoothed" in line.label for line in loss.picture.lines)  # type: ignore[union-attr]
        assert not any(line.faint for line in loss.picture.lines)  # type: ignore[union-attr]
        await pilot.press("l")
        await pilot.pause()
        # Loss from 0.4 to 2.4, under one decade: round values, each at its logarithm.
        _, y_ticks = loss.axes
        assert app.options.log_y and "1" in y_ticks.labels
        for value, label in zip(y_ticks.values, y_ticks.labels):
            assert value == pytest.approx(math.log10(float(label)))
        await pilot.press("l", "w")
        assert app.options.window == 100 and loss.picture.x_low == 199  # type: ignore[union-attr]
        await pilot.press("w", "w", "w")
        assert app.options.window is None and loss.picture.x_low == 0  # type: ignore[union-attr]
        await pilot.press("x")
        assert app.options.by_time and loss.picture.x_low == T0 + 1  # type: ignore[union-attr]
        await pilot.pause()
        x_ticks, _ = loss.axes
        assert all(label.startswith("+") for label in x_ticks.labels) and "+1m" in x_ticks.labels


async def test_rank_modes(run_dir: Path) -> None:
    app = app_for(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot)
        await pilot.press("s", "s", "s")  # smoothing off: one line per rank
        loss = chart(app, "loss")
        await pilot.press("r")
        assert app.options.rank_mode == "band"
        assert {line.label for line in loss.picture.lines} >= {
            "train min",
            "train median",
            "train max",
        }  # type: ignore[union-attr]
        await pilot.press("r")
        assert app.options.rank_mode == "one" and app.options.rank == 0
        assert {line.label for line in loss.picture.lines} == {"train", "eval"}  # type: ignore[union-attr]
        await pilot.press("r")
        assert app.options.rank == 1
        assert {line.label for line in loss.picture.lines} == {"train", "eval r0"}  # type: ignore[union-attr]
        train = next(line for line in loss.picture.lines if line.label == "train")  # type: ignore[union-attr]
        assert max(train.y) == pytest.approx(2.4 + 0.02 * math.sin(1))  # rank 1 peaks at step 0
        await pilot.press("r")
        assert app.options.rank_mode == "overlay"


async def test_pause_freezes_the_picture_while_data_arrives(tmp_path: Path) -> None:
    run_dir = write_run(
        tmp_path / "runs",
        ranks=1,
        steps=50,
        ended=False,
        pid=os.getpid(),
        host=socket.gethostname(),
    )  # a live run
    app = app_for(run_dir, follow=True)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot)
        await pilot.press("p")
        frozen = chart(app, "loss").picture
        assert "PAUSED" in str(app.query_one(Header).render())
        points = app.store.points
        with (run_dir / "rank-0.jsonl").open("ab") as f:
            f.write(line("fixed-run", 0, 1, 1000, "metrics", 60, T0 + 100, m={"loss": 9.0}))
        await loaded(app, pilot, points + 1, draw=False)
        await pilot.pause(0.3)
        assert app.store.points == points + 1, "data keeps arriving while paused"
        assert chart(app, "loss").picture is frozen
        await pilot.press("p")
        await pilot.pause(0.2)
        assert chart(app, "loss").picture is not frozen
        assert chart(app, "loss").picture.y_high == 9.0  # type: ignore[union-attr]


async def test_export_writes_svg_and_csv_into_the_run_directory(run_dir: Path) -> None:
    app = app_for(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot)
        await pilot.press("e")
        await pilot.pause()
    svg, table = app.exported
    assert svg.parent == run_dir and table.parent == run_dir
    assert svg.read_text().lstrip().startswith("<svg")
    rows = list(csv.DictReader(table.open()))
    assert len([r for r in rows if r["metric"] == "loss"]) == 2 * 300
    first = next(r for r in rows if r["metric"] == "loss" and r["rank"] == "1" and r["step"] == "0")
    assert float(first["value"]) == pytest.approx(2.4 + 0.02 * math.sin(1))


async def test_switch_runs_and_pick_a_metric(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    write_run(folder, name="older", ranks=1, steps=50)
    write_run(
        folder,
        name="newer",
        ranks=1,
        steps=80,
        extra={i: {"custom_metric": float(i)} for i in range(80)},
    )
    app = app_for(folder)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot, 50 * 7)
        deadline = time.monotonic() + 5
        while len(app.runs) < 2 and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.press("n")
        # Newest first, the cursor on the run shown (the newest, by default).
        assert isinstance(app.screen, PickScreen)
        names = [Path(key).name for key, _ in app.screen.choices]
        assert names == ["newer", "older"]
        assert app.screen.query_one(OptionList).highlighted == 0
        await pilot.press("down", "enter")
        await pilot.pause()
        assert app.current_run().name == "older"  # type: ignore[union-attr]
        await pilot.press("n")
        assert app.screen.query_one(OptionList).highlighted == 1
        await pilot.press("up", "enter")
        await pilot.pause()
        assert app.current_run().name == "newer"  # type: ignore[union-attr]
        await pilot.press("c")
        assert isinstance(app.screen, PickScreen)
        keys = [key for key, _ in app.screen.choices]
        titles = [title for _, title in app.screen.choices]
        # Each chart once: no "loss" twice, no "grad_norm" beside "grad norm".
        assert len(titles) == len(set(titles)) and "grad_norm" not in titles
        assert titles.count("loss") == 1 and "custom_metric" in titles
        assert app.screen.query_one(OptionList).highlighted == 0  # the focused chart: loss
        await pilot.press(*["down"] * keys.index("metric:custom_metric"), "enter")
        await pilot.pause()
        focused = app.focused
        assert isinstance(focused, Chart) and focused.spec.key == "metric:custom_metric"
        assert focused.picture is not None and focused.picture.y_high == 79.0


async def test_bell_toggles(run_dir: Path) -> None:
    app = app_for(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("b")
        assert app.bell_on is False
        await pilot.press("b")
        assert app.bell_on is True


async def test_names_from_the_wire_are_inert(tmp_path: Path) -> None:
    evil = "\x1b]0;x\x07[bold red]x[/]"
    run_dir = tmp_path / "runs" / "evil"
    run_dir.mkdir(parents=True)
    (run_dir / "rank-0.jsonl").write_bytes(
        line(evil, 0, 1, 0, "start", None, T0, info={"host": evil})
        + line(evil, 0, 1, 1, "metrics", 0, T0 + 1, m={evil: 1.0, "loss": 1.0})
        + line(evil, 0, 1, 2, "metrics", 1, T0 + 2, m={evil: 2.0, "loss": 0.5})
    )
    app = app_for(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot)
        header = app.query_one(Header).render()
        assert "\\x1b]0;x\\x07[bold red]x[/]" in str(header) and "\x1b" not in str(header)
        assert not header.spans or all("bold red" not in str(span.style) for span in header.spans)  # type: ignore[union-attr]
        await pilot.press("c")
        labels = [label for _key, label in app.screen.choices]  # type: ignore[attr-defined]
        assert "\\x1b]0;x\\x07[bold red]x[/]" in labels
        await pilot.press(*["down"] * labels.index("\\x1b]0;x\\x07[bold red]x[/]"), "enter")
        await pilot.pause()
        svg = app.export_screenshot()
        assert "[bold&#160;red]x[/]" in svg or "[bold red]x[/]" in svg
        assert "\x1b" not in svg


async def test_an_alert_shows_in_the_panel_the_header_and_as_a_mark_on_its_chart(
    tmp_path: Path,
) -> None:
    from lmtop.tui.alert_actions import Alerting
    from lmtop.tui.alert_settings import AlertSettings

    run_dir = write_run(tmp_path / "runs", ranks=2, steps=300)
    spiked = run_dir / "rank-1.jsonl"
    lines = spiked.read_bytes().splitlines(keepends=True)
    # Step 150 of rank 1: the loss jumps to 30x its level (rank 1's lines: start, then steps).
    import json

    record = json.loads(lines[151])
    assert record["step"] == 150
    record["m"]["loss"] = 30.0
    lines[151] = json.dumps(record).encode() + b"\n"
    spiked.write_bytes(b"".join(lines))
    source = Follower([str(run_dir)], follow=False, live=False)
    app = LmtopApp(source, refresh_hz=20, alerts=Alerting(AlertSettings(), source.runs))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot, points=600)
        deadline = time.monotonic() + 10
        while not app.alerts and time.monotonic() < deadline:
            await pilot.pause(0.05)
        app.redraw(force=True)
        await pilot.pause()
        spikes = [(a.type, a.rank, a.metric, a.step) for a in app.alerts if a.type == "spike"]
        assert spikes == [("spike", 1, "loss", 150)]
        # The learning-curve verdicts are listed too (info: not counted in the badge).
        assert {a.severity for a in app.alerts if a.type != "spike"} <= {"info"}
        panel = app.query_one("#alerts")
        rows = [panel.get_row_at(i) for i in range(panel.row_count)]  # type: ignore[attr-defined]
        (row,) = [r for r in rows if str(r[-1]).startswith("loss 30 at step 150")]
        assert str(row[0]) == "WARN" and str(row[1]) == "150" and str(row[2]) == "1"
        assert "⚠ 1 alert  " in str(app.query_one(Header).render())  # singular
        loss = chart(app, "loss")
        assert loss.picture is not None and (150.0, "alert") in loss.picture.marks
        lr = chart(app, "lr")
        assert lr.picture is not None and not [m for m in lr.picture.marks if m[1] == "alert"]
        # The panel cuts the text to its width; `a` then enter shows it whole.
        await pilot.press("a")
        assert isinstance(app.screen, PickScreen)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, TextScreen)
        shown = str(app.screen.query_one(Static).render())
        assert app.alerts[-1].message in shown and "baseline" in shown and "rank" in shown  # newest
        # The context: the metric ±50 steps around the alert, the spike's bar under the ^.
        spike = next(a for a in app.alerts if a.type == "spike")
        app.show_alert(spike)
        await pilot.pause()
        lines = "\n".join(str(s.render()) for s in app.screen.query(Static)).splitlines()
        at = lines.index("loss on rank 1, steps 100-200")
        bars, caret = lines[at + 1], lines[at + 2]
        assert caret.strip() == "^ step 150" and bars[caret.index("^")] == "█"
        assert len(bars) == 101 and bars.count("█") == 1 and set(bars) - {"█"} == {"▁"}
        assert lines[at + 3].startswith("min 0.") and "max 30 at step 150" in lines[at + 3]
        await pilot.press("escape")
        await pilot.press("escape")
        assert not isinstance(app.screen, TextScreen)


async def test_the_alerts_panel_and_badge_show_the_shown_run_only(tmp_path: Path) -> None:
    from lmtop.tui.alert_actions import Alerting
    from lmtop.tui.alert_settings import AlertSettings

    spiky = write_run(
        tmp_path / "runs", name="spiky", ranks=1, steps=300, extra={150: {"loss": 30.0}}
    )
    write_run(tmp_path / "runs", name="calm", ranks=1, steps=300)
    source = Follower([str(tmp_path / "runs")], follow=False, live=False)
    app = LmtopApp(source, refresh_hz=20, alerts=Alerting(AlertSettings(), source.runs))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot, points=2 * 300 * 7)
        deadline = time.monotonic() + 10
        while not app.alerts and time.monotonic() < deadline:
            await pilot.pause(0.05)
        warnings = {(a.run, a.step) for a in app.alerts if a.severity != "info"}
        assert warnings == {("spiky", 150)}
        verdicts = {a.run: 0 for a in app.alerts if a.type == "learning_curve"}
        for a in app.alerts:
            if a.type == "learning_curve":
                verdicts[a.run] += 1
        seen = set()
        for key in [run.key for run in app.runs]:
            app.run_key = key  # what choosing it in the run picker (n) does
            app.redraw(force=True)
            await pilot.pause()
            run = app.current_run()
            assert run is not None
            seen.add(run.name)
            panel = app.query_one("#alerts")
            header = str(app.query_one(Header).render())
            # Each run's panel: its own alerts and verdicts; the badge counts warnings only.
            shown = verdicts.get(run.name, 0)
            if run.name == spiky.name:
                assert panel.row_count == 1 + shown and "⚠ 1 alert  " in header  # type: ignore[attr-defined]
            else:
                assert panel.row_count == shown and "alerts" not in header  # type: ignore[attr-defined]
        assert seen == {"spiky", "calm"}


async def test_tab_turns_pages_of_charts_and_never_focuses_a_hidden_one(run_dir: Path) -> None:
    app = app_for(run_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(app, pilot)
        seen = []
        for _ in range(6):
            assert isinstance(app.focused, Chart) and not app.focused.has_class("hidden")
            assert len(visible_charts(app)) == 2
            seen.append(app.focused.spec.key)
            await pilot.press("tab")
            await pilot.pause()
        assert len(set(seen)) == 6 and app.focused is chart(app, "loss")  # all six, then back
        shown = visible_charts(app)
        assert "of 6" in str(shown[-1].border_subtitle)  # the screen says more exist
        await pilot.resize_terminal(60, 20)
        await pilot.pause()
        await pilot.pause()
        assert visible_charts(app) == [app.focused]
        await pilot.press("tab")
        await pilot.pause()
        assert visible_charts(app) == [app.focused] == [chart(app, "lr")]


async def test_many_ranks_draw_a_band_and_the_table_says_how_many_it_shows(
    tmp_path: Path,
) -> None:
    run = write_run(tmp_path / "runs", ranks=16, steps=60)
    app = app_for(run)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(app, pilot, 16 * 60)
        await pilot.pause()
        loss = chart(app, "loss").picture
        assert loss is not None and {line.label for line in loss.lines} >= {
            "train min",
            "train median",
            "train max",
        }
        ranks = app.query_one("#ranks")
        assert str(ranks.border_title).startswith("16 ranks, 5 shown")
        await pilot.press("r")
        loss = chart(app, "loss").picture
        assert loss is not None and "train r15" in {line.label for line in loss.lines}


async def test_ctrl_c_quits(run_dir: Path) -> None:
    app = app_for(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot)
        await pilot.press("ctrl+c")
        await pilot.pause()
    assert not app.is_running


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda tmp: tmp / "does-not-exist", "does not exist"),
        (lambda tmp: tmp, "holds no runs lmtop can read"),
        (
            lambda tmp: (tmp / "notes.txt", (tmp / "notes.txt").write_text("hi"))[0],
            "not a file lmtop can read",
        ),
    ],
)
async def test_a_path_with_nothing_readable_says_so(tmp_path: Path, make, said: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    app = app_for(path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        app.redraw_clock()
        header = str(app.query_one(Header).render())
        assert said in header and "waiting for a run" not in header


def test_with_no_path_a_local_lmtop_runs_is_named(tmp_path: Path) -> None:
    from lmtop.tui import discovery

    for name in ("a", "b"):
        write_run(tmp_path / "lmtop_runs", name=name, ranks=1, steps=5)
    said = discovery.nothing_readable([], cwd=tmp_path)
    assert "./lmtop_runs holds 2 runs: lmtop lmtop_runs" in said


def test_python_dash_m_lmtop_runs_the_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "lmtop", "--version"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("lmtop "), done.stderr


async def test_o_overlays_every_run_with_its_colour_and_legend(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    write_run(folder, name="lr-low", ranks=1, steps=100, extra={50: {"loss": 12.0}})
    write_run(
        folder, name="lr-high", ranks=2, steps=150, extra={s: {"loss": 3.0} for s in range(150)}
    )
    app = app_for(folder)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot, 100 * 7 + 150 * 7 * 2)
        deadline = time.monotonic() + 5
        while len(app.runs) < 2 and time.monotonic() < deadline:
            await pilot.pause(0.05)
        shown = app.current_run()
        assert shown is not None
        await pilot.press("o")
        await pilot.pause()
        loss = chart(app, "loss").picture
        assert loss is not None
        runs = {line.label.split(" ")[0]: line.color for line in loss.lines if not line.faint}
        assert set(runs) == {"lr-low", "lr-high"} and len(set(runs.values())) == 2
        assert loss.lines[-1].label.startswith(shown.name), "the run shown is drawn on top"
        assert loss.y_high == 12.0 and loss.x_high >= 149, "both runs' ranges"
        # lr-low's spike, which its smoothed curve flattens, is in its raw envelope.
        raw = [line for line in loss.lines if line.faint and line.label.startswith("lr-low")]
        assert max(y for line in raw for y in line.y) == 12.0
        title = str(chart(app, "loss").border_title)
        assert "lr-low" in title and "lr-high" in title and "2 runs" in title
        await pilot.press("x")
        await pilot.pause()
        x_ticks, _ = chart(app, "loss").axes
        assert x_ticks.labels and all(label.startswith("+") for label in x_ticks.labels)
        await pilot.press("o")
        await pilot.pause()
        loss = chart(app, "loss").picture
        assert loss is not None and {line.label.split(" ")[0] for line in loss.lines} <= {
            "train",
            "eval",
        }


async def test_alerts_over_a_long_history_are_those_of_a_plain_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alerts over a history read in many polls (computed after its first frame, from the run
    files read again) are exactly the alerts a plain read raises, in the same order."""
    import json

    from lmtop.tui import follow, replay
    from lmtop.tui.alert_actions import Alerting
    from lmtop.tui.alert_settings import AlertSettings

    run_dir = write_run(tmp_path / "runs", ranks=2, steps=3000)
    for rank, steps in ((0, (500, 2500)), (1, (1500,))):
        path = run_dir / f"rank-{rank}.jsonl"
        lines = path.read_bytes().splitlines(keepends=True)
        for step in steps:
            record = json.loads(lines[step + 1])
            record["m"]["loss"] = 10.0
            lines[step + 1] = json.dumps(record).encode() + b"\n"
        path.write_bytes(b"".join(lines))
    monkeypatch.setattr(follow, "READ_BUDGET", 64 << 10)  # many small batches
    monkeypatch.setattr(follow, "MIN_READ", 16 << 10)
    monkeypatch.setattr(replay, "REPLAY_FROM_BYTES", 0)  # 2.5 MB stands for a long history

    plain_source = Follower([str(run_dir)], follow=False, live=False)
    plain = Alerting(AlertSettings(), plain_source.runs)
    expected = []
    while not plain_source.done:
        expected += [a for k, m in plain_source.poll(0) for a in plain.feed(k, m)]
    want = [(a.type, a.rank, a.metric, a.step) for a in expected]
    assert ("spike", 1, "loss", 1500) in want

    source = Follower([str(run_dir)], follow=False, live=False)
    app = LmtopApp(source, refresh_hz=20, alerts=Alerting(AlertSettings(), source.runs))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot, points=2 * 3000 * 7)
        deadline = time.monotonic() + 20
        while len(app.alerts) < len(want) and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.pause(0.3)
        assert [(a.type, a.rank, a.metric, a.step) for a in app.alerts] == want


async def test_events_are_marks_on_every_chart_and_i_lists_them_with_the_config(
    tmp_path: Path,
) -> None:
    # Both ranks say each event, as a Trainer's ranks do: one event naming both.
    said = {49: "evaluation: eval_loss 1.23", 99: "checkpoint saved: ckpt-100", 149: "evaluation"}
    config = {"learning_rate": 3e-4, "lora_r": 16, "max_grad_norm": 1.0, "total_steps": 200}
    run_dir = write_run(tmp_path / "runs", ranks=2, steps=200, events=said, config=config)
    app = app_for(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot, 200 * 7 * 2)
        run = app.current_run()
        assert run is not None
        assert [(e.step, e.text, e.ranks) for e in run.events] == [
            (step, text, (0, 1)) for step, text in sorted(said.items())
        ]
        for shown in visible_charts(app):
            assert shown.picture is not None
            marks = [x for x, why in shown.picture.marks if why == "event"]
            assert marks == [49.0, 99.0, 149.0], shown.id
        await pilot.press("x")  # wall time: the marks move with the axis
        await pilot.pause()
        loss = chart(app, "loss").picture
        assert loss is not None
        assert [x for x, why in loss.marks if why == "event"] == [e.t for e in run.events]
        await pilot.press("i")
        await pilot.pause()
        assert isinstance(app.screen, TextScreen)
        page = str(app.screen.query_one(Static).render())
        assert "lora_r" in page and "16" in page and "3e-4" in page
        listed = [text for text in said.values() if text in page]
        assert listed and page.index("ckpt-100") < page.index("eval_loss 1.23"), "newest first"
        assert "ranks 0-1" in page
        await pilot.press("escape")
        assert not isinstance(app.screen, TextScreen)


async def test_overlaid_runs_are_listed_in_their_colours_with_the_config_that_differs(
    tmp_path: Path,
) -> None:
    from lmtop.tui.charts import rich_color
    from lmtop.tui.widgets import RanksTable, RunsTable

    folder = tmp_path / "sweep"
    for name, lr, r in (("lr1e-4-r8", 1e-4, 8), ("lr3e-4-r16", 3e-4, 16)):
        config = {"learning_rate": lr, "lora": {"r": r, "alpha": 16}, "output_dir": f"out/{name}"}
        write_run(folder, name=name, ranks=1, steps=100, config={**config, "seed": 0})
    app = app_for(folder)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot, 2 * 100 * 7)
        deadline = time.monotonic() + 5
        while len(app.runs) < 2 and time.monotonic() < deadline:
            await pilot.pause(0.05)
        table = app.query_one(RunsTable)
        assert not table.display, "one run's ranks until runs are overlaid"
        await pilot.press("o")
        await pilot.pause()
        assert table.display and not app.query_one(RanksTable).display
        columns = [str(c.label) for c in table.columns.values()]
        # What the sweep varied first, then what differs between any two runs; never the seed.
        assert columns == [
            "run",
            "state",
            "step",
            "loss",
            "eval",
            "learning_rate",
            "lora.r",
            "output_dir",
        ]
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        by_name = {str(row[0]).split()[1]: row for row in rows}
        assert [str(c) for c in by_name["lr3e-4-r16"][5:]] == ["3e-4", "16", "out/lr3e-4-r16"]
        loss = chart(app, "loss").picture
        assert loss is not None
        drawn = {line.label.split(" ")[0]: line.color for line in loss.lines if not line.faint}
        for name, row in by_name.items():
            swatch = row[0].spans[0].style
            assert str(swatch) == rich_color(drawn[name]), f"{name}: its lines' colour"
        assert "(on top)" in str(by_name[app.current_run().name][0])  # type: ignore[union-attr]
        assert str(by_name["lr1e-4-r8"][2]) == "99" and str(by_name["lr1e-4-r8"][1]) == "finished"
        await pilot.press("o")
        await pilot.pause()
        assert not table.display and app.query_one(RanksTable).display


async def test_space_in_the_run_picker_marks_the_runs_to_overlay(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    for number, name in enumerate(("lr-a", "lr-b", "lr-c")):
        write_run(folder, name=name, ranks=1, steps=60 + 10 * number)
    app = app_for(folder)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot, (60 + 70 + 80) * 7)
        deadline = time.monotonic() + 5
        while len(app.runs) < 3 and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.press("n")
        assert isinstance(app.screen, PickScreen)
        # Newest first: lr-c, lr-b, lr-a. Marking one run compares nothing yet.
        await pilot.press("space")
        await pilot.pause()
        assert not app.options.compare
        await pilot.press("down", "down", "space")
        await pilot.pause()
        options = app.screen.query_one(OptionList)
        prompts = [str(options.get_option_at_index(i).prompt) for i in range(3)]
        assert [p[0] for p in prompts] == ["●", " ", "●"], prompts
        await pilot.press("escape")
        await pilot.pause()
        assert app.options.compare, "a second run marked: the overlay is on"
        loss = chart(app, "loss").picture
        assert loss is not None
        drawn = {line.label.split(" ")[0] for line in loss.lines if not line.faint}
        assert drawn == {"lr-a", "lr-c"} and "2 runs" in loss.note
        await pilot.press("n", "space", "escape")  # lr-c unmarked: still lr-a over the shown
        await pilot.pause()
        loss = chart(app, "loss").picture
        assert app.options.compare and loss is not None and "2 runs" in loss.note
        await pilot.press("n", "down", "down", "space", "escape")  # the last mark goes
        await pilot.pause()
        assert not app.options.compare and not app.options.overlaid


def test_expensive_frames_are_drawn_less_often_within_the_screens_share_of_a_core() -> None:
    from lmtop.tui.app import MAX_FRAME_SECONDS, frame_period

    assert frame_period(0.01, 2.0, 0.1) == 0.5, "cheap frames: the refresh rate"
    assert frame_period(0.125, 2.0, 0.1) == 1.25, "125 ms a frame: 10 % of a core"
    assert frame_period(5.0, 2.0, 0.1) == MAX_FRAME_SECONDS, "never slower than this"
    assert frame_period(5.0, 2.0, None) == 0.5, "no budget (tests, a caller's choice)"
    assert frame_period(5.0, 0.2, 0.1) == 5.0, "a slower refresh asked for is kept"
    assert frame_period(0.125, 2.0, 0.15, rest=0.05) == 1.25, "what the poll thread leaves"
    assert frame_period(0.01, 2.0, 0.1, rest=0.2) == MAX_FRAME_SECONDS, "nothing left"


class _Clocks:
    """A process as FramePace sees it: its UI thread's CPU, its whole CPU and the wall clock."""

    def __init__(self) -> None:
        self.ui = self.process = self.wall = 0.0

    def __call__(self) -> tuple[float, float, float]:
        return self.ui, self.process, self.wall

    def run(self, seconds: float, frame_cost: float, rest: float) -> None:
        """``seconds`` pass with one frame of ``frame_cost`` drawn and the rest of the process
        taking ``rest`` of a core."""
        self.wall += seconds
        self.ui += frame_cost
        self.process += frame_cost + rest * seconds


def _follow(
    pace: FramePace, clocks: _Clocks, frames: int, cost: float, rest: float, **drawn: bool
) -> float:
    """Draws ``frames`` frames at the pace's period; the process's share of a core over them."""
    began = clocks.process, clocks.wall
    for _ in range(frames):
        clocks.run(pace.period(), cost, rest)
        pace.drawn(**drawn)
    return (clocks.process - began[0]) / (clocks.wall - began[1])


def test_the_whole_viewer_keeps_to_its_share_of_a_core_with_the_charts_as_fast_as_that_allows() -> (
    None
):
    """What top shows for lmtop is the whole process: the frames' pace leaves room for the poll
    thread, whose share does not shrink with fewer frames, and uses the rest."""
    from lmtop.tui.app import MAX_FRAME_SECONDS

    clocks = _Clocks()
    pace = FramePace(2.0, 0.13, clocks)
    pace.drawn(first=True)
    # 16 live ranks on the 2-core VM: 130 ms a frame, the poll thread 4 % of a core. Drawing
    # within 13 % of a core on its own (the last stop's rule) took the process to 17 %.
    share = _follow(pace, clocks, 40, cost=0.13, rest=0.04)
    assert 0.125 <= _follow(pace, clocks, 20, cost=0.13, rest=0.04) <= 0.131, share
    assert pace.period() == pytest.approx(0.13 / 0.09, rel=0.01)
    # Few ranks, cheap frames: the refresh rate asked for.
    cheap = FramePace(2.0, 0.13, clocks)
    _follow(cheap, clocks, 20, cost=0.02, rest=0.01)
    assert cheap.period() == 0.5
    # A poll thread past the budget on its own: the slowest pace, not a stop.
    _follow(pace, clocks, 20, cost=0.13, rest=0.2)
    assert pace.period() == MAX_FRAME_SECONDS


def test_a_short_burst_of_work_does_not_hold_the_charts_at_their_slowest() -> None:
    """A collection or a large batch, 0.3 s of the poll thread in a 0.5 s interval, weighs what
    it lasted: the charts keep their pace (smoothed by frame, it held them at 2 s for three
    frames)."""
    clocks = _Clocks()
    pace = FramePace(2.0, 0.13, clocks)
    _follow(pace, clocks, 20, cost=0.02, rest=0.01)  # 4 ranks: the refresh rate
    clocks.run(0.5, 0.02, 0.6)
    pace.drawn()
    periods = [pace.period()]
    for _ in range(5):
        clocks.run(periods[-1], 0.02, 0.01)
        pace.drawn()
        periods.append(pace.period())
    assert max(periods) < 1.0, periods


async def test_reading_a_history_is_not_taken_for_the_pace_of_following(tmp_path: Path) -> None:
    """The poll thread's share the pace learns is that of following: a history read, judged
    and cached (seconds of work) would hold the charts at their slowest long after it."""
    run_dir = write_run(tmp_path / "runs", ranks=2, steps=8000)  # past one poll's 2 MB
    app = app_for(run_dir, follow=True)
    async with app.run_test(size=SIZE) as pilot:
        deadline = time.monotonic() + 30
        while (app.catching_up or not app.bursts) and time.monotonic() < deadline:
            await pilot.pause(0.05)
        for _ in range(4):  # steady frames, following a finished run
            await pilot.pause(0.3)
            app.redraw(force=True)
        assert app.bursts and app.pace.rest < 0.3, app.pace.rest


def test_a_history_read_or_a_pause_does_not_slow_the_charts_after_it() -> None:
    """30 s of a history read and a minute paused: the charts come back at the pace they had
    while following, not at their slowest."""
    clocks = _Clocks()
    pace = FramePace(2.0, 0.13, clocks)
    _follow(pace, clocks, 20, cost=0.13, rest=0.04)
    steady = pace.period()
    # A history read: the poll thread busy for 30 s. The frames' cost is learned, not its share.
    _follow(pace, clocks, 15, cost=0.13, rest=0.9, steady=False)
    clocks.run(60.0, 0.9, 0.0)  # paused a minute: the clock redrawn 60 times, no frame
    pace.drawn()
    assert pace.period() == pytest.approx(steady)


def test_a_frame_that_takes_seconds_slows_the_pace_to_its_slowest() -> None:
    """A frame costing 5 s of CPU (a huge terminal on a loaded box, where the UI thread gets
    40 % of a core: 12.5 s of wall time) is a frame, not a pause: the charts are drawn every
    2 s from then on, not back to back."""
    from lmtop.tui.app import MAX_FRAME_SECONDS

    clocks = _Clocks()
    pace = FramePace(2.0, 0.13, clocks)
    pace.drawn(first=True)
    for _ in range(3):
        clocks.run(12.5, 5.0, 0.01)
        pace.drawn()
    assert pace.period() == MAX_FRAME_SECONDS


def test_the_first_interval_after_start_up_weighs_what_it_lasted() -> None:
    """The first frames' intervals hold the first poll's work (the registry, sockets, files):
    a 0.25 s burst in 0.3 s does not hold the charts at their slowest for the next seconds."""
    clocks = _Clocks()
    pace = FramePace(2.0, 0.13, clocks)
    pace.drawn(first=True)
    clocks.run(0.3, 0.02, 0.25 / 0.3)
    pace.drawn()
    assert pace.period() < 1.0, pace.rest


def test_work_that_never_stops_being_a_burst_is_learned_as_the_pace() -> None:
    """Hundreds of ranks whose files outgrow a poll's read keep the poll thread catching up
    for good: after 30 s of it, its share is the steady one, and the charts slow down to keep
    the budget rather than draw as if it cost nothing."""
    from lmtop.tui.app import MAX_FRAME_SECONDS

    clocks = _Clocks()
    pace = FramePace(2.0, 0.13, clocks)
    _follow(pace, clocks, 10, cost=0.13, rest=0.04)
    _follow(pace, clocks, 10, cost=0.13, rest=0.2, steady=False)  # ~15 s: not yet
    assert pace.period() < MAX_FRAME_SECONDS
    _follow(pace, clocks, 40, cost=0.13, rest=0.2, steady=False)
    assert pace.period() == MAX_FRAME_SECONDS


async def test_times_and_values_no_calendar_or_scale_holds_never_crash_the_pages(
    tmp_path: Path,
) -> None:
    # Any finite t is a valid line (1e20 is one); a window of ±1e308 values has an infinite
    # span. The run page (i) and the alert page with its context show "-" and bars.
    from lmtop.tui.alerts import Alert

    run_dir = tmp_path / "runs" / "odd"
    run_dir.mkdir(parents=True)
    lines = [line("odd", 0, 1, 0, "start", None, 1e20, info={"host": "h", "pid": 1})]
    for step in range(40):
        value = 1e308 if step == 20 else -1e308 if step == 21 else 1.0
        lines.append(line("odd", 0, 1, step + 1, "metrics", step, 1e20, m={"loss": value}))
    lines.append(line("odd", 0, 1, 41, "event", 5, 1e20, text="evaluation"))
    (run_dir / "rank-0.jsonl").write_bytes(b"".join(lines))
    app = app_for(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(app, pilot, 40)
        await pilot.press("i")
        await pilot.pause()
        assert isinstance(app.screen, TextScreen)
        page = str(app.screen.query_one(Static).render())
        assert "started  -" in page and "evaluation" in page
        await pilot.press("escape")
        run = app.current_run()
        assert run is not None
        fields = dict(type="spike", severity="warning", run="odd", key=run.key, rank=0)
        app.show_alert(
            Alert(**fields, metric="loss", step=20, value=1e308, baseline=1.0, t=1e20, message="x")
        )  # type: ignore[arg-type]
        await pilot.pause()
        shown = "\n".join(str(s.render()) for s in app.screen.query(Static))
        assert "at       -" in shown and "max 1e308 at step 20" in shown and "█" in shown
