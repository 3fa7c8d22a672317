"""The app's keys: the bindings (the one place they are listed; the help is built from them),
what each does to the view options, and the layout of the charts grid."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from textual import events
from textual.app import App
from textual.binding import Binding, BindingType
from textual.containers import Grid
from textual.geometry import Size

from . import export, frame, layout, metrics
from .charts import DEFAULT_CHARTS, ViewOptions, metric_chart
from .screens import HelpScreen, PickScreen, RunPickScreen, TextScreen, help_text
from .text import inert
from .widgets import Chart, SystemPanel

if TYPE_CHECKING:
    from .alerts import Alert
    from .runbook import RunView
    from .store import Store
    from .system import Sampler

SMOOTHING_STEPS = (0.0, 0.6, 0.9, 0.99)
WINDOWS: tuple[int | None, ...] = (None, 100, 1000, 10_000)
RANK_MODES = ("overlay", "band", "one")

BINDINGS: list[BindingType] = [
    Binding("q", "quit", "quit"),
    # Textual's ctrl+c shows a toast about ctrl+q; in a terminal, ctrl+c means stop.
    Binding("ctrl+c", "quit", "quit", show=False, priority=True),
    Binding("question_mark", "help", "help", tooltip="this help"),
    Binding("enter", "zoom", "zoom", tooltip="zoom the chart to the whole screen, and back"),
    Binding("c", "pick_metric", "chart", tooltip="pick the metric the chart shows"),
    Binding("s", "smoothing", "smooth", tooltip="smoothing: off, 0.6, 0.9, 0.99 (over a faint raw series)"),
    Binding("l", "log", "log y", tooltip="log y axis"),
    Binding("w", "window", "window", tooltip="window: whole run, last 100 / 1000 / 10000 steps"),
    Binding("x", "x_axis", "x axis", tooltip="x axis: step or wall time"),
    Binding("r", "ranks", "ranks", tooltip="ranks: overlay, min-median-max band (first beyond 4 ranks), one rank (r again: next rank)"),
    Binding("p", "pause", "pause", tooltip="pause the picture (data keeps arriving)"),
    Binding("e", "export", "export", tooltip="export an SVG screenshot and a CSV of the run's series into the run directory"),
    Binding("n", "pick_run", "runs", tooltip="switch runs (newest first); space marks runs to overlay"),
    Binding("o", "compare", "compare", tooltip="overlay the runs marked in n (else every run found), one colour per run, the one shown on top"),
    Binding("a", "pick_alert", "alerts", tooltip="the alerts, newest first: enter shows one in full"),
    Binding("i", "run_info", "run", tooltip="the run: where it runs, its config, its events (newest first)"),
    Binding("b", "toggle_bell", "bell", show=False, tooltip="terminal bell on critical alerts: on / off"),
    # tab is the screen's own key (focus next): priority takes it for the charts' pages.
    Binding("tab", "next_chart", "next chart", show=False, priority=True, tooltip="next chart (turns the page when more charts exist than fit)"),
    Binding("shift+tab", "next_chart(-1)", "previous chart", show=False, priority=True, tooltip="previous chart"),
    Binding("right,down", "next_chart", "next chart", show=False, tooltip="next chart"),
    Binding("left,up", "next_chart(-1)", "previous chart", show=False, tooltip="previous chart"),
]  # fmt: skip


class Keys(App[int]):
    """What the keys do: the app's base, changing its view state on the UI thread."""

    options: ViewOptions
    zoomed: bool
    paused: bool
    bell_on: bool
    dirty: bool
    store: Store
    store_lock: threading.Lock
    runs: tuple[RunView, ...]
    run_key: str | None
    exported: tuple[Path, Path]
    alerts: list[Alert]
    table_rows: int
    system_rows: int
    sampler: Callable[[], Sampler] | None
    rank_mode_chosen: bool

    if TYPE_CHECKING:  # the app's own

        def current_run(self) -> RunView | None: ...
        def _changed(self, note: str | None) -> None: ...
        def redraw(self, force: bool = False) -> None: ...

    def on_resize(self, event: events.Resize) -> None:
        # The app's size follows the screen's a moment later: the event has the new one.
        self.layout_charts(event.size)

    def layout_charts(self, size: Size | None = None) -> None:
        """Divides the screen for its size (see :mod:`.layout`): called on every resize.

        The focused chart is always shown: the charts that fit are the page that holds it.
        """
        width, height = size or self.size
        charts = list(self.query(Chart))
        if not charts:
            return
        plan = layout.plan(width, height, len(charts), self.zoomed)
        focused = self.focused if isinstance(self.focused, Chart) else None
        index = charts.index(focused) if focused in charts else 0
        shown = layout.page(len(charts), plan.shown, index)
        for number, chart in enumerate(charts):
            chart.set_class(number not in shown, "hidden")
            chart.border_subtitle = ""
        if plan.shown < len(charts):
            # The charts that do not fit are one key away, and the screen says so.
            charts[shown[-1]].border_subtitle = (
                f"charts {shown[0] + 1}-{shown[-1] + 1} of {len(charts)} · tab: more"
                if plan.shown > 1
                else f"{index + 1} of {len(charts)} · tab: next"
            )
        grid = self.query_one("#charts", Grid)
        grid.styles.grid_size_columns = plan.columns
        grid.styles.grid_size_rows = -(-plan.shown // plan.columns)
        bottom = self.query_one("#bottom")
        bottom.styles.height = plan.bottom
        bottom.display = plan.bottom > 0
        self.query_one(SystemPanel).display = plan.system and self.sampler is not None
        self.table_rows = plan.table_rows
        self.system_rows = max(0, plan.bottom - 1)  # under its top border
        if focused is None or focused.has_class("hidden"):
            charts[shown[0]].focus()
        self.dirty = True

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """A picker or the help, when open, keeps tab and the arrows for itself."""
        return not (action == "next_chart" and len(self.screen_stack) > 1)

    def action_next_chart(self, step: int = 1) -> None:
        """Focuses the next chart, turning the page (or, zoomed, the chart) when it is hidden."""
        charts = list(self.query(Chart))
        focused = self.focused if isinstance(self.focused, Chart) else None
        index = charts.index(focused) if focused in charts else -step
        target = charts[(index + step) % len(charts)]
        hidden = target.has_class("hidden")
        target.remove_class("hidden")  # shown first: a widget that is not displayed takes no focus
        target.focus()
        if hidden:
            self.call_after_refresh(self.layout_charts)

    def action_zoom(self) -> None:
        self.zoomed = not self.zoomed
        self.layout_charts()

    def action_smoothing(self) -> None:
        steps = SMOOTHING_STEPS
        index = steps.index(self.options.smoothing) if self.options.smoothing in steps else 0
        self.options.smoothing = steps[(index + 1) % len(steps)]
        self._changed(f"smoothing {self.options.smoothing or 'off'}")

    def action_log(self) -> None:
        self.options.log_y = not self.options.log_y
        self._changed(f"log y {'on' if self.options.log_y else 'off'}")

    def action_window(self) -> None:
        index = WINDOWS.index(self.options.window)
        self.options.window = window = WINDOWS[(index + 1) % len(WINDOWS)]
        self._changed(f"window: {'whole run' if window is None else f'last {window} steps'}")

    def action_x_axis(self) -> None:
        self.options.by_time = not self.options.by_time
        self._changed(f"x axis: {'wall time' if self.options.by_time else 'step'}")

    def action_ranks(self) -> None:
        run = self.current_run()
        ranks = [r.rank for r in run.ranks] if run and run.ranks else [0]
        options = self.options
        # The first mode is the default for the rank count (see redraw): band beyond 4 ranks.
        modes = ("band", "overlay", "one") if len(ranks) > 4 else RANK_MODES
        self.rank_mode_chosen = True
        if options.rank_mode == "one" and options.rank != ranks[-1]:
            later = [r for r in ranks if r > options.rank]
            options.rank = later[0] if later else ranks[0]
        else:
            current = modes.index(options.rank_mode) if options.rank_mode in modes else 0
            options.rank_mode = modes[(current + 1) % 3]
            options.rank = ranks[0]
        detail = f" {options.rank}" if options.rank_mode == "one" else ""
        self._changed(f"ranks: {options.rank_mode}{detail}")

    def action_compare(self) -> None:
        if len(self.runs) < 2 and not self.options.compare:
            self.notify("one run only: nothing to compare", timeout=2)
            return
        self.options.compare = not self.options.compare
        self._changed(f"compare runs {'on' if self.options.compare else 'off'}")

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
        with self.store_lock:
            names = sorted(self.store.metrics.get(run.key, set()))
        # A default chart is listed once, under its title, and not again under the metric it
        # draws ("grad norm", not also "grad_norm").
        drawn = {
            metrics.first_present(line, set(names)) for s in DEFAULT_CHARTS for line in s.lines
        }
        choices = [(spec.key, spec.title) for spec in DEFAULT_CHARTS]
        choices += [(f"metric:{n}", inert(n)) for n in names if n not in drawn]

        def chosen(key: str | None) -> None:
            if key is None:
                return
            spec = next((s for s in DEFAULT_CHARTS if s.key == key), None)
            chart.spec = spec or metric_chart(key.removeprefix("metric:"))
            self._changed(None)

        self.push_screen(PickScreen("chart", choices, chart.spec.key), chosen)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(help_text(self.BINDINGS)))

    def action_pick_run(self) -> None:
        runs = sorted(self.runs, key=frame.recency, reverse=True)
        choices = [(r.key, frame.run_label(r)) for r in runs]
        marked = self.options.overlaid

        def chosen(key: str | None) -> None:
            if key is not None:
                self.run_key = key
                self._changed(None)

        def mark(key: str) -> None:
            # Marking runs means comparing them with the run shown: the overlay is on while the
            # marked runs and the one shown are two or more, off when the last mark goes.
            marked.symmetric_difference_update({key})
            shown = self.current_run()
            together = marked | ({shown.key} if shown else set())
            self.options.compare = bool(marked) and len(together) > 1
            self._changed(None)

        current = self.current_run()
        screen = RunPickScreen(choices, current.key if current else None, marked, mark)
        self.push_screen(screen, chosen)

    def action_pick_alert(self) -> None:
        run = self.current_run()
        # An alert of no run (lmtop's own error) is every run's.
        shown = [a for a in self.alerts if run is not None and a.key in (run.key, "")]
        if not shown:
            self.notify("no alerts in this run", timeout=2)
            return
        choices = [(str(i), frame.alert_line(a)) for i, a in reversed(list(enumerate(shown)))]

        def chosen(index: str | None) -> None:
            if index is not None:
                self.show_alert(shown[int(index)])

        self.push_screen(PickScreen("alerts, newest first", choices, choices[0][0]), chosen)

    def action_run_info(self) -> None:
        run = self.current_run()
        if run is None:
            self.notify("no run yet", timeout=2)
            return
        self.push_screen(TextScreen(inert(run.name, 60), frame.run_text(run)))

    def show_alert(self, alert: Alert) -> None:
        """The whole of one alert, which the panel cuts to its width."""
        with self.store_lock:
            context = frame.alert_context(self.store, alert)
        self.push_screen(TextScreen(f"{alert.severity} alert", frame.alert_text(alert), context))

    def action_export(self) -> None:
        run = self.current_run()
        if run is None:
            self.notify("nothing to export yet", severity="warning")
            return
        with self.store_lock:
            table = export.series_csv(self.store, run.key)
        try:
            self.exported = export.export(run, self.export_screenshot(), table)
        except OSError as exc:
            self.notify(f"export failed: {exc}", severity="error", markup=False)
            return
        svg, csv = self.exported
        self.notify(f"saved {svg} and {csv}", timeout=8, markup=False)
