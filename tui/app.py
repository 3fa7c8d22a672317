"""``lmtop``: the Textual app. A thin view of a :class:`~.source.Source` and a :class:`~.store.Store`.

A thread worker polls the source and adds each batch to the store (and the alert engine); a timer
on the UI thread redraws what changed, at most ``refresh_hz`` times a second. Pausing freezes the
picture while data keeps arriving.
"""

from __future__ import annotations

import csv
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from .alert_settings import AlertSettings
from .charts import DEFAULT_CHARTS, ViewOptions, metric_chart, picture
from .follow import Run
from .source import Source
from .store import Store
from .text import inert
from .widgets import AlertsPanel, Chart, Header, RanksTable, header_text, now, rank_rows

# Redraws per second at most, by default: a live chart moving twice a second reads as live (htop
# redraws every 1.5 s), and what crosses a slow SSH link stays under 30 KB/s (benchmarks/).
REFRESH_HZ = 2.0
# Messages of a long history held for the alert engine until the history is read (~1 KB each).
DEFER_ALERT_MESSAGES = 200_000

SMOOTHING_STEPS = (0.0, 0.6, 0.9, 0.99)
WINDOWS: tuple[int | None, ...] = (None, 100, 1000, 10_000)
RANK_MODES = ("overlay", "band", "one")

HELP = """\
q        quit
?        this help
tab ← →  move between charts (shift+tab, ↑ ↓ too)
enter    zoom the chart to the whole screen, and back
c        pick the metric the chart shows
s        smoothing: off, 0.6, 0.9, 0.99 (over a faint raw series)
l        log y axis
w        window: whole run, last 100 / 1000 / 10000 steps
x        x axis: step or wall time
r        ranks: overlay, min-median-max band, one rank (r again: next rank)
p        pause the picture (data keeps arriving)
e        export an SVG screenshot and a CSV of the run's series into the run directory
n        switch runs
b        terminal bell on critical alerts: on / off

Charts draw each terminal column's min and max from the full series: no spike is hidden.
Red x marks and lines are NaN/Inf steps, yellow ▼ marks alert steps, a red line the clipping threshold.
"""


class HelpScreen(ModalScreen[None]):
    """The keys."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = "HelpScreen { align: center middle; } #help { width: auto; max-width: 90; border: round $accent; padding: 1 2; background: $surface; }"

    def compose(self) -> ComposeResult:
        yield Static(Text(HELP), id="help")

    def action_dismiss(self, result: None = None) -> None:  # type: ignore[override]
        self.dismiss(None)


class PickScreen(ModalScreen[str | None]):
    """A list to pick from: a metric for a chart, or a run."""

    BINDINGS = [Binding("escape,q", "cancel", "cancel")]
    DEFAULT_CSS = "PickScreen { align: center middle; } PickScreen OptionList { width: 70; max-height: 80%; border: round $accent; }"

    def __init__(self, title: str, choices: list[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.choices = choices

    def compose(self) -> ComposeResult:
        options = OptionList(*(Option(Text(label), id=key) for key, label in self.choices))
        options.border_title = self.title_text
        yield options

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class LmtopApp(App[int]):
    """Live charts of every rank of a training run."""

    TITLE = "lmtop"
    CSS = """
    Screen { layout: vertical; }
    #charts { grid-size: 2; grid-gutter: 0; height: 1fr; }
    #bottom { height: 9; }
    #ranks { width: 1fr; }
    #alerts { width: 1fr; }
    .zoomed #bottom { display: none; }
    .hidden { display: none; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        Binding("enter", "zoom", "zoom"),
        Binding("c", "pick_metric", "chart"),
        Binding("s", "smoothing", "smooth"),
        Binding("l", "log", "log y"),
        Binding("w", "window", "window"),
        Binding("x", "x_axis", "x axis"),
        Binding("r", "ranks", "ranks"),
        Binding("p", "pause", "pause"),
        Binding("e", "export", "export"),
        Binding("n", "pick_run", "runs"),
        Binding("b", "toggle_bell", "bell", show=False),
        Binding("right,down", "app.focus_next", "next chart", show=False),
        Binding("left,up", "app.focus_previous", "previous chart", show=False),
    ]

    def __init__(self, source: Source, refresh_hz: float = REFRESH_HZ, alerts: Any = None) -> None:
        super().__init__()
        self.source = source
        self.store = Store()
        self.options = ViewOptions()
        self.refresh_hz = refresh_hz
        self.drawn_at = 0.0  # monotonic time of the last frame
        self.catching_up = False  # a long history is being read (set by the receiving thread)
        self._was_catching_up = False
        self._painted = threading.Event()  # a frame of data read to the end is on the screen
        self._paint_pending = False
        self.engine = alerts
        self.alerts: list[Any] = []
        self.lock = threading.Lock()
        self.dirty = True
        self.paused = False
        self.bell_on = True
        self.zoomed = False
        self.run_key: str | None = None
        self.frames = 0
        self.first_frame_at: float | None = None
        self.color = "NO_COLOR" not in os.environ

    # -- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(id="header")
        with Grid(id="charts"):
            for spec in DEFAULT_CHARTS:
                yield Chart(spec, id=f"chart-{spec.key}")
        with Horizontal(id="bottom"):
            yield RanksTable(id="ranks")
            yield AlertsPanel(id="alerts")
        yield Footer()

    def on_mount(self) -> None:
        self.follow()
        # Checked often, drawn at most refresh_hz times a second: new data waits at most 50 ms
        # for a frame (not a whole period), and the frame rate stays capped.
        self.set_interval(min(0.05, 1 / self.refresh_hz), self._tick)
        self.query(Chart).first().focus()
        self.call_after_refresh(self.layout_charts)

    def on_resize(self) -> None:
        self.layout_charts()

    def layout_charts(self) -> None:
        """As many charts as fit: 2 at 80x24, all 6 on a big terminal; one when zoomed."""
        width, height = self.size
        charts = list(self.query(Chart))
        columns = 1 if width < 60 else 2 if width < 180 else 3
        rows = max(1, (height - 12) // 9) if not self.zoomed else 1
        count = 1 if self.zoomed else min(len(charts), columns * rows)
        if self.zoomed:
            columns = 1
        focused = self.focused if isinstance(self.focused, Chart) else charts[0]
        visible = [focused] if self.zoomed else charts[:count]
        if focused not in visible:
            visible[-1] = focused
        for chart in charts:
            chart.set_class(chart not in visible, "hidden")
        grid = self.query_one("#charts", Grid)
        grid.styles.grid_size_columns = min(columns, len(visible))
        grid.styles.grid_size_rows = -(-len(visible) // min(columns, len(visible)))
        self.set_class(self.zoomed, "zoomed")
        self.dirty = True

    # -- data -----------------------------------------------------------------------------------

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="follow", description="follow runs"
    )
    def follow(self) -> None:
        """Polls the source until the app quits; adds every batch to the store.

        Alerts over a long history are computed once it is read and painted (its first frame
        does not wait for them), holding at most DEFER_ALERT_MESSAGES messages meanwhile.
        """
        worker = get_current_worker()
        ticked = 0.0
        unalerted: list[list[Any]] = []
        waiting = 0
        try:
            while not worker.is_cancelled:
                batch = self.source.poll(0.1)
                now = time.monotonic()
                if now - ticked >= 0.5:  # stalls and stragglers, also while messages flow
                    ticked = now
                    self._tick_alerts()
                if batch:
                    with self.lock:
                        self.store.add(batch)
                        self.dirty = True
                    if self.engine is not None:
                        unalerted.append(batch)
                        waiting += len(batch)
                # Read after the batch is in the store: the last batch of a history is drawn.
                catching_up = self.catching_up = getattr(self.source, "catching_up", False)
                if unalerted and (not catching_up or waiting > DEFER_ALERT_MESSAGES):
                    if len(unalerted) > 1:  # a long history was read: paint it, then alert
                        self._painted.clear()
                        self._paint_pending = True
                        self.dirty = True
                        self._painted.wait(timeout=1.0)
                    self._feed_alerts(unalerted)
                    unalerted, waiting = [], 0
                if not batch and self.source.done:
                    time.sleep(0.1)
        finally:
            self.source.close()  # in this thread: the socket is never used by two threads
            if self.engine is not None and hasattr(self.engine, "close"):
                self.engine.close()  # open snapshots are written

    def painted(self) -> None:
        """Called by a chart as it renders: once this pass ends, the frame is on the screen."""
        if self._paint_pending:
            self._paint_pending = False
            self.call_later(self._painted.set)

    def _feed_alerts(self, batches: list[list[Any]]) -> None:
        """Runs batches through the engine (outside the lock: the screen does not wait)."""
        raised = [alert for batch in batches for m in batch for alert in self.engine.feed(m)]
        with self.lock:
            self._take_alerts(raised)

    def _tick_alerts(self) -> None:
        if self.engine is None:
            return
        with self.lock:
            self._take_alerts(self.engine.tick(time.monotonic(), self.source.runs))

    def _take_alerts(self, alerts: list[Any]) -> None:
        if not alerts:
            return
        self.alerts.extend(alerts)
        del self.alerts[:-1000]
        self.dirty = True
        if self.bell_on and any(a.severity == "critical" for a in alerts):
            self.call_from_thread(self.bell)

    def current_run(self) -> Run | None:
        """The run shown: the chosen one, else the newest."""
        runs = self.source.runs
        if self.run_key in runs:
            return runs[self.run_key]
        if not runs:
            return None
        return max(
            runs.values(),
            key=lambda r: min((s.started or 0.0 for s in r.ranks.values()), default=0.0),
        )

    # -- drawing --------------------------------------------------------------------------------

    def _tick(self) -> None:
        # While a long history is read, a frame a second shows progress; drawing more often
        # would slow the reading down (both need the one interpreter lock).
        # The moment it is all read, it is drawn, whenever the last progress frame was.
        catching_up = self.catching_up
        period = max(1.0, 1 / self.refresh_hz) if catching_up else 1 / self.refresh_hz
        if self._was_catching_up and not catching_up:
            period = 0.0
        self._was_catching_up = catching_up
        if time.monotonic() - self.drawn_at >= period:
            self.redraw()

    def redraw(self, force: bool = False) -> None:
        """Redraws the visible charts, the header and the tables if something changed."""
        if (self.paused and not force) or not (self.dirty or force):
            return
        started = time.perf_counter()
        self.drawn_at = time.monotonic()
        with self.lock:
            self.dirty = False
            run = self.current_run()
            self.query_one(Header).update(
                header_text(self.store, run, len(self.source.runs), now(), self._counters(run))
            )
            if run is not None:
                alerted = [
                    (a.metric, a.step)
                    for a in self.alerts
                    if a.run == run.name and a.step is not None
                ]
                for chart in self.query(Chart):
                    if chart.has_class("hidden"):
                        continue
                    names = {name for line in chart.spec.lines for name in line}
                    steps_by_alert = [step for metric, step in alerted if metric in names]
                    pic = picture(
                        self.store,
                        run.name,
                        chart.spec,
                        self.options,
                        chart.columns,
                        run.config,
                        steps_by_alert,
                    )
                    chart.show(pic, self.options, self.color)
                self.query_one(RanksTable).update_rows(rank_rows(self.store, run, now()))
            shown = [a for a in self.alerts if run is not None and a.run == run.name]
            self.query_one(AlertsPanel).update_alerts(shown)
        self.frames += 1
        self.last_frame_ms = (time.perf_counter() - started) * 1000
        if self.first_frame_at is None and self.store.points:
            self.first_frame_at = time.monotonic()

    def _counters(self, run: Run | None) -> dict[str, Any]:
        """The header's counters; alerts are the shown run's."""
        alerts = [a for a in self.alerts if run is not None and a.run == run.name]
        return {
            "bad_live": getattr(self.source, "bad_live", 0),
            "alerts": len(alerts),
            "critical": sum(1 for a in alerts if a.severity == "critical"),
            "paused": self.paused,
        }

    # -- keys -----------------------------------------------------------------------------------

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_zoom(self) -> None:
        self.zoomed = not self.zoomed
        self.layout_charts()

    def action_smoothing(self) -> None:
        index = (
            SMOOTHING_STEPS.index(self.options.smoothing)
            if self.options.smoothing in SMOOTHING_STEPS
            else 0
        )
        self.options.smoothing = SMOOTHING_STEPS[(index + 1) % len(SMOOTHING_STEPS)]
        self._changed(f"smoothing {self.options.smoothing or 'off'}")

    def action_log(self) -> None:
        self.options.log_y = not self.options.log_y
        self._changed(f"log y {'on' if self.options.log_y else 'off'}")

    def action_window(self) -> None:
        index = WINDOWS.index(self.options.window)
        self.options.window = WINDOWS[(index + 1) % len(WINDOWS)]
        self._changed(
            f"window: {'whole run' if self.options.window is None else f'last {self.options.window} steps'}"
        )

    def action_x_axis(self) -> None:
        self.options.by_time = not self.options.by_time
        self._changed(f"x axis: {'wall time' if self.options.by_time else 'step'}")

    def action_ranks(self) -> None:
        run = self.current_run()
        ranks = sorted(run.ranks) if run else [0]
        mode = self.options.rank_mode
        if mode == "one" and self.options.rank != ranks[-1]:
            later = [r for r in ranks if r > self.options.rank]
            self.options.rank = later[0] if later else ranks[0]
        else:
            mode = RANK_MODES[(RANK_MODES.index(mode) + 1) % len(RANK_MODES)]
            self.options.rank_mode = mode
            self.options.rank = ranks[0]
        detail = f" {self.options.rank}" if self.options.rank_mode == "one" else ""
        self._changed(f"ranks: {self.options.rank_mode}{detail}")

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.redraw(force=True)
        self.notify("paused: data keeps arriving" if self.paused else "resumed", timeout=2)

    def action_toggle_bell(self) -> None:
        self.bell_on = not self.bell_on
        self.notify(f"bell on critical alerts {'on' if self.bell_on else 'off'}", timeout=2)

    def action_pick_metric(self) -> None:
        run = self.current_run()
        chart = self.focused if isinstance(self.focused, Chart) else None
        if run is None or chart is None:
            return
        names = sorted(self.store.metrics.get(run.name, set()))
        choices = [(spec.key, spec.title) for spec in DEFAULT_CHARTS] + [
            (f"metric:{n}", inert(n)) for n in names
        ]

        def chosen(key: str | None) -> None:
            if key is None:
                return
            spec = next((s for s in DEFAULT_CHARTS if s.key == key), None)
            chart.spec = spec or metric_chart(key.removeprefix("metric:"))
            self._changed(None)

        self.push_screen(PickScreen("chart", choices), chosen)

    def action_pick_run(self) -> None:
        runs = sorted(self.source.runs.values(), key=lambda r: r.name)
        choices = [(r.key, f"{inert(r.name, 60)}  {r.state}  {len(r.ranks)} ranks") for r in runs]

        def chosen(key: str | None) -> None:
            if key is not None:
                self.run_key = key
                self._changed(None)

        self.push_screen(PickScreen("runs", choices), chosen)

    def action_export(self) -> None:
        run = self.current_run()
        if run is None:
            self.notify("nothing to export yet", severity="warning")
            return
        folder = run.dir if run.dir is not None and os.access(run.dir, os.W_OK) else Path.cwd()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        svg = self.save_screenshot(f"lmtop-{stamp}.svg", str(folder))
        table = folder / f"lmtop-{stamp}.csv"
        with self.lock, table.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["rank", "metric", "step", "time", "value"])
            for (name, rank, metric), series in sorted(self.store.series.items()):
                if name != run.name:
                    continue
                for step, t, value in zip(series.steps, series.times, series.values):
                    writer.writerow([rank, metric, step, f"{t:.6f}", repr(value)])
        self.exported = (Path(svg), table)
        self.notify(f"saved {svg} and {table}", timeout=8)

    def _changed(self, note: str | None) -> None:
        self.dirty = True
        self.redraw(force=True)
        if note:
            self.notify(note, timeout=2)

    def on_unmount(self) -> None:
        self.workers.cancel_group(self, "follow")


def run_app(
    paths: Sequence[str],
    follow: bool = True,
    refresh_hz: float = REFRESH_HZ,
    settings: AlertSettings | None = None,
) -> int:
    """Opens the viewer on ``paths`` (or this user's live runs) until the user quits.

    ``settings`` configures the alerts (default: the documented defaults).
    """
    from .alert_actions import Alerting
    from .follow import Follower

    source = Follower(paths, follow=follow)
    alerts = Alerting(settings if settings is not None else AlertSettings(), source.runs)
    app = LmtopApp(source, refresh_hz=refresh_hz, alerts=alerts)
    app.run()
    return app.return_code or 0
