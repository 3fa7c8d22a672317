"""The pieces of the screen: a chart, the run header, the ranks table, the alerts panel."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

from rich.style import Style
from rich.text import Span, Text
from textual.app import RenderResult
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from .charts import RANK_COLORS, ChartSpec, Picture, ViewOptions, draw, rich_color
from .follow import Run
from .store import Store
from .text import inert

STALL_SECONDS = 60.0  # a live run silent this long is shown as stalled


class Chart(PlotextPlot, can_focus=True):
    """One plotext chart, redrawn from a :class:`Picture` when its data changed."""

    DEFAULT_CSS = """
    Chart { border: round $panel; height: 1fr; min-height: 6; }
    Chart:focus { border: round $accent; }
    """

    def __init__(self, spec: ChartSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.picture: Picture | None = None
        self._drawn_with: tuple[bool, bool] | None = None

    def show(self, picture: Picture, options: ViewOptions, color: bool) -> None:
        """Replaces the picture and repaints, unless it is the one already shown."""
        key = (options.log_y, color)  # the drawing's other inputs besides the picture
        if picture == self.picture and key == self._drawn_with:
            return
        self.picture, self._drawn_with = picture, key
        title = Text(picture.title)
        if picture.note:
            title.append(f" · {picture.note}")
        for label, line_color in picture.legend():
            title.append("  ━ ", style=rich_color(line_color) if color else "")
            title.append(label)
        self.border_title = title
        draw(self.plt, picture, options, color)
        self.refresh()

    def render(self) -> RenderResult:
        """plotext's picture, with its style runs merged (see :func:`compact_styles`)."""
        rendered = super().render()
        painted = getattr(self.app, "painted", None)
        if painted is not None:
            painted()
        return compact_styles(rendered) if isinstance(rendered, Text) else rendered

    @property
    def columns(self) -> int:
        """How many data columns fit: one per character cell of the plot area."""
        return max(8, self.size.width - 12)


def compact_styles(text: Text) -> Text:
    """The same picture in fewer style runs: what crosses a slow SSH link shrinks.

    Every change of style costs a reset and a full SGR sequence (~25 bytes) on the terminal, and
    plotext switches style at every blank between two points (a run of gray dots is
    dot, blank, dot, blank, ...). A blank looks the same in any foreground colour, so blanks
    join the run before them when the background (and anything else visible on a blank) is the
    same; adjacent runs of one style merge.
    """
    plain = text.plain
    styles: list[Style | str | None] = [None] * len(plain)
    for span in text.spans:  # from_ansi spans do not overlap
        styles[span.start : span.end] = [span.style] * (span.end - span.start)
    spans: list[Span] = []
    start, current = 0, styles[0] if styles else None
    for index, char in enumerate(plain):
        style = styles[index]
        if style == current:
            continue
        if char == " " and _blank_alike(style, current):
            continue
        if char == "\n":
            style = current  # a newline shows nothing; the run ends at the next visible change
            continue
        if current is not None and index > start:
            spans.append(Span(start, index, current))
        start, current = index, style
    if current is not None and len(plain) > start:
        spans.append(Span(start, len(plain), current))
    compact = text.copy()
    compact.spans = spans
    return compact


def _blank_alike(a: Style | str | None, b: Style | str | None) -> bool:
    """Whether a blank looks the same in style ``a`` as in ``b``."""
    if not isinstance(a, Style) or not isinstance(b, Style):
        return False
    return (
        a.bgcolor == b.bgcolor
        and not (a.reverse or b.reverse or a.underline or b.underline or a.strike or b.strike)
        and not (a.overline or b.overline)
    )


@dataclass(slots=True)
class RankRow:
    """What the ranks table shows for one rank."""

    rank: int
    step: int | None
    step_time: float | None
    lag: int | None
    memory: float | None
    seen: float | None  # seconds since its last message
    status: str | None
    straggler: bool = False
    silent: bool = False


def step_time(store: Store, run: str, rank: int, metrics: set[str], last: int = 50) -> float | None:
    """Seconds per step of a rank: its ``step_time`` metric, else from its recent wall times."""
    for name in ("step_time", "step_time_s", "train/step_time"):
        series = store.get(run, rank, name)
        if series is not None and len(series):
            return series.last
    for name in sorted(metrics):
        series = store.get(run, rank, name)
        if series is not None and len(series) > 2:
            n = min(last, len(series) - 1)
            steps = series.steps[-1] - series.steps[-1 - n]
            return (series.times[-1] - series.times[-1 - n]) / steps if steps > 0 else None
    return None


def rank_rows(store: Store, run: Run, now_wall: float) -> list[RankRow]:
    """Per-rank figures, with stragglers (step time > 1.5x the median) and silent ranks marked."""
    metrics = store.metrics.get(run.name, set())
    rows = []
    for number in sorted(run.ranks):
        state = run.ranks[number]
        memory = None
        for name in (
            "memory_gb",
            "gpu_memory_allocated_gb",
            "memory_allocated_gb",
            "host_rss_gb",
            "rss_gb",
        ):
            series = store.get(run.name, number, name)
            if series is not None and len(series):
                memory = series.last
                break
        seen = now_wall - state.last_t if state.last_t and not state.done else None
        rows.append(
            RankRow(
                number,
                state.last_step,
                step_time(store, run.name, number, metrics),
                None,
                memory,
                seen,
                state.status,
            )
        )
    steps = [r.step for r in rows if r.step is not None]
    leader = max(steps) if steps else None
    times = [r.step_time for r in rows if r.step_time]
    median = statistics.median(times) if times else None
    for row in rows:
        if leader is not None and row.step is not None:
            row.lag = leader - row.step
        row.straggler = bool(
            median and row.step_time and len(times) > 1 and row.step_time > 1.5 * median
        )
        row.silent = row.status is None and row.seen is not None and row.seen > 30
    return rows


class RanksTable(DataTable[Any]):
    """Every rank: last step, step time, lag behind the leader, memory, last seen."""

    def on_mount(self) -> None:
        self.cursor_type = "none"
        self.zebra_stripes = True
        self.add_columns("rank", "step", "s/step", "lag", "mem GB", "seen", "state")
        self._shown: list[list[str]] | None = None

    def update_rows(self, rows: list[RankRow]) -> None:
        """Replaces the rows, when what they show changed (a repaint costs terminal bytes)."""
        shown = [_cells(row) for row in rows]
        if shown == self._shown:
            return
        self._shown = shown
        self.clear()
        for row, cells in zip(rows, shown):
            style = (
                "bold red"
                if row.silent or row.status == "crashed"
                else "yellow"
                if row.straggler
                else ""
            )
            texts = [Text(c, style=style) for c in cells]
            texts[0].stylize(
                RANK_COLORS[row.rank % len(RANK_COLORS)]
            )  # the rank's colour in charts
            self.add_row(*texts)


def _cells(row: RankRow) -> list[str]:
    note = row.status or ("silent" if row.silent else "straggler" if row.straggler else "live")
    return [
        str(row.rank),
        "-" if row.step is None else str(row.step),
        "-" if row.step_time is None else f"{row.step_time:.3f}",
        "-" if row.lag is None else str(row.lag),
        "-" if row.memory is None else f"{row.memory:.1f}",
        "-" if row.seen is None else _ago(row.seen),
        note,
    ]


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{max(0.0, seconds):.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def run_state(run: Run, now_wall: float) -> str:
    """live / finished / failed / crashed, or stalled for a live run silent too long."""
    state = run.state
    if state == "live":
        last = max((r.last_t or 0.0) for r in run.ranks.values()) if run.ranks else 0.0
        if last and now_wall - last > STALL_SECONDS:
            return "stalled"
    return state


def total_steps(config: dict[str, Any]) -> int | None:
    """The run's planned number of steps, when its config says."""
    for key in ("total_steps", "max_steps", "num_training_steps", "steps"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def header_text(
    store: Store, run: Run | None, runs: int, now_wall: float, extra: dict[str, Any]
) -> Text:
    """The header line: run, host, state, elapsed, step/total and ETA, epoch, world, counters."""
    text = Text(no_wrap=True, overflow="ellipsis")
    if run is None:
        text.append("lmtop", style="bold")
        text.append("  waiting for a run… (start a training job that calls lmtop.hooks.publish)")
        return text
    info = run.info
    state = run_state(run, now_wall)
    colors = {
        "live": "green",
        "finished": "blue",
        "failed": "red",
        "crashed": "bold red",
        "stalled": "yellow",
    }
    text.append(inert(run.name, 60), style="bold")
    if runs > 1:
        text.append(f" ({runs} runs)")
    text.append(f"  {inert(info.get('host', '?'), 30)}  ")
    text.append(f" {state} ", style=f"reverse {colors.get(state, '')}")
    first_t = min((r.started for r in run.ranks.values() if r.started), default=None)
    rank0 = run.ranks.get(min(run.ranks)) if run.ranks else None
    steps = [r.last_step for r in run.ranks.values() if r.last_step is not None]
    step = max(steps) if steps else None
    total = total_steps(run.config)
    last_t = max((r.last_t or 0.0) for r in run.ranks.values()) if run.ranks else None
    if first_t and last_t:
        text.append(f"  {_duration((now_wall if state == 'live' else last_t) - first_t)}")
    if step is not None:
        text.append(f"  step {step}" + (f"/{total}" if total else ""))
        seconds = (
            step_time(store, run.name, rank0.rank, store.metrics.get(run.name, set()))
            if rank0
            else None
        )
        if total and seconds and state == "live" and step < total:
            text.append(f" ETA {_duration((total - step) * seconds)}")
    epoch = None
    for rank in sorted(run.ranks):
        series = store.get(run.name, rank, "epoch")
        if series is not None and len(series):
            epoch = series.last
            break
    if epoch is not None and math.isfinite(epoch):
        text.append(f"  epoch {epoch:.2f}")
    text.append(f"  world {run.world}")
    dropped, bad = run.dropped, run.bad_lines + extra.get("bad_live", 0)
    text.append(f"  dropped {dropped}", style="yellow" if dropped else "dim")
    text.append(f"  bad {bad}", style="yellow" if bad else "dim")
    alerts = extra.get("alerts", 0)
    if alerts:
        critical = extra.get("critical", 0)
        text.append(f"  ⚠ {alerts} alerts", style="bold red" if critical else "bold yellow")
    if extra.get("paused"):
        text.append("  PAUSED", style="reverse")
    return text


class Header(Static):
    """The run header; always shown as plain text (names from the wire stay inert)."""

    DEFAULT_CSS = "Header { height: 1; background: $panel; padding: 0 1; }"


class AlertsPanel(DataTable[Any]):
    """The newest alerts first: severity, step, rank, what happened."""

    DEFAULT_CSS = "AlertsPanel { overflow-x: hidden; }"

    def on_mount(self) -> None:
        self.cursor_type = "none"
        self.add_columns("", "step", "rank", "alert")
        self._shown: tuple[int, Any] = (0, None)

    def update_alerts(self, alerts: list[Any]) -> None:
        """Replaces the rows with the newest alerts, when there are new ones."""
        shown = (len(alerts), alerts[-1] if alerts else None)
        if shown == self._shown:
            return
        self._shown = shown
        self.clear()
        styles = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
        for alert in reversed(alerts[-200:]):
            style = styles.get(getattr(alert, "severity", "info"), "")
            rank = getattr(alert, "rank", None)
            step = getattr(alert, "step", None)
            self.add_row(
                Text(getattr(alert, "severity", "")[:4].upper(), style=style),
                Text("-" if step is None else str(step)),
                Text("-" if rank is None else str(rank)),
                Text(inert(getattr(alert, "message", ""), 300), style=style),
            )


def now() -> float:
    """Wall-clock time (the publishers' clock in messages is wall time too)."""
    return time.time()
