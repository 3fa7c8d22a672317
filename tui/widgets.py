"""The pieces of the screen: a chart, the run header, the ranks table, the alerts panel."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from rich.style import Style
from rich.text import Span, Text
from textual.app import RenderResult
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from . import numbers
from .axes import Axis
from .charts import RANK_COLORS, ChartSpec, Picture, ViewOptions, draw, rich_color
from .text import inert


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
        self._drawn_with: tuple[Any, ...] | None = None
        self.axes: tuple[Axis, Axis] = (Axis(), Axis())

    def show(self, picture: Picture, options: ViewOptions, color: bool) -> None:
        """Replaces the picture and repaints, unless it is the one already shown."""
        # The drawing's other inputs besides the picture: the ticks depend on the size.
        key = (
            options.log_y,
            options.by_time,
            options.smoothing,
            options.rank_mode,
            color,
            self.size.width,
            self.size.height,
        )
        if picture == self.picture and key == self._drawn_with:
            return
        self.picture, self._drawn_with = picture, key
        title = Text(picture.title)
        if picture.note:
            title.append(f" · {picture.note}")
        for label, colours in picture.legend():
            title.append("  ")
            for swatch in colours[:8]:
                title.append("━", style=rich_color(swatch) if color else "")
            title.append(f" {label}")
        # How the chart is drawn, so that no key's effect is a mystery.
        state = [f"smoothed {options.smoothing:g}, raw grey"] if options.smoothing else []
        if any(line.label.endswith(" median") for line in picture.lines):
            state.append("ranks min-median-max")
        elif options.rank_mode == "one":
            state.append(f"rank {options.rank}")
        if options.log_y:
            state.append("log")
        if state:
            title.append(f"  ({', '.join(state)})", style="dim")
        self.border_title = title
        self.axes = draw(self.plt, picture, options, color, (self.size.width, self.size.height))
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
    seen: float | None  # seconds since its last message, on the publisher's clock
    state: str  # live, silent, straggler, or how it ended


class RanksTable(DataTable[Any]):
    """Every rank: last step, step time, lag behind the leader, memory, last seen."""

    def on_mount(self) -> None:
        self.cursor_type = "none"
        self.zebra_stripes = True
        self.add_columns("rank", "step", "s/step", "lag", "mem GB", "seen", "state")
        self._shown: list[list[str]] | None = None

    def update_rows(self, rows: list[RankRow], fit: int | None = None) -> None:
        """Replaces the rows, when what they show changed (a repaint costs terminal bytes).

        ``fit``: the rows the table has room for; when fewer than the ranks, its title says so
        (the table scrolls).
        """
        count = len(rows)
        title = f"{count} rank{'s' * (count != 1)}"
        if fit is not None and count > fit:
            title += f", {fit} shown (scroll)"
        self.border_title = title
        shown = [_cells(row) for row in rows]
        if shown == self._shown:
            return
        self._shown = shown
        self.clear()
        for row, cells in zip(rows, shown):
            style = ROW_STYLES.get(row.state, "")
            texts = [Text(c, style=style) for c in cells]
            # The rank's colour in the charts: the same terminal colour plotext prints.
            texts[0].stylize(rich_color(RANK_COLORS[row.rank % len(RANK_COLORS)]))
            self.add_row(*texts)


ROW_STYLES = {
    "silent": "bold red",
    "crashed": "bold red",
    "error": "red",
    "straggler": "yellow",
    "unreachable": "magenta",  # another node's rank whose link is down: neither dead nor well
}


def _cells(row: RankRow) -> list[str]:
    return [
        str(row.rank),
        numbers.step(row.step),
        "-" if row.step_time is None else numbers.number(row.step_time),
        numbers.step(row.lag),
        "-" if row.memory is None else numbers.number(row.memory),
        "-" if row.seen is None else numbers.duration(row.seen),
        row.state,
    ]


@dataclass(slots=True)
class RunRow:
    """What the runs table shows for one run overlaid on the charts."""

    name: str
    color: str  # its lines' colour on the charts
    pinned: bool  # the run shown: drawn on top
    state: str
    step: int | None
    loss: float | None
    eval_loss: float | None
    config: list[str]  # the values of the config keys that differ between the runs


class RunsTable(DataTable[Any]):
    """The runs overlaid (``o``): each in its lines' colour, where it stands, and the config
    keys whose values differ between them (what the sweep varied)."""

    def on_mount(self) -> None:
        self.cursor_type = "none"
        self.zebra_stripes = True
        self._shown: tuple[list[str], list[list[str]]] | None = None

    def update_runs(self, rows: list[RunRow], keys: list[str]) -> None:
        """Replaces the rows (and the config columns), when what they show changed."""
        cells = [_run_cells(row) for row in rows]
        if (keys, cells) == self._shown:
            return
        self._shown = (keys, cells)
        self.border_title = f"{len(rows)} runs overlaid" + (
            f" · config that differs: {len(keys)} key{'s' * (len(keys) != 1)}" if keys else ""
        )
        self.clear(columns=True)
        self.add_columns("run", "state", "step", "loss", "eval", *(inert(k, 24) for k in keys))
        for row, texts in zip(rows, cells):
            first = Text()
            first.append("━━ ", style=rich_color(row.color))
            first.append(texts[0], style="bold" if row.pinned else "")
            self.add_row(first, *(Text(t) for t in texts[1:]))


def _run_cells(row: RunRow) -> list[str]:
    return [
        inert(row.name, 32) + (" (on top)" if row.pinned else ""),
        row.state,
        numbers.step(row.step),
        "-" if row.loss is None else numbers.number(row.loss),
        "-" if row.eval_loss is None else numbers.number(row.eval_loss),
        *row.config,
    ]


class SystemPanel(Static):
    """The machine: host CPU and memory, each GPU's utilisation, memory, power, temperature."""

    DEFAULT_CSS = "SystemPanel { width: 35; height: 100%; padding: 0 1; }"

    def on_mount(self) -> None:
        # The viewer's machine: over SSH, which box this is.
        self.border_title = inert(socket.gethostname(), 30)


class Header(Static):
    """The run header; always shown as plain text (names from the wire stay inert)."""

    DEFAULT_CSS = "Header { width: 100%; height: 1; background: $panel; padding: 0 1; }"


class AlertsPanel(DataTable[Any]):
    """The newest alerts first: severity, step, rank, what happened."""

    DEFAULT_CSS = "AlertsPanel { overflow-x: hidden; }"

    def on_mount(self) -> None:
        self.cursor_type = "row"  # a click (or enter once focused) shows the alert in full
        self.add_columns("", "step", "rank", "alert")
        self._shown: tuple[int, Any] = (0, None)
        self._rows: list[Any] = []

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if 0 <= event.cursor_row < len(self._rows):
            show = getattr(self.app, "show_alert", None)
            if show is not None:
                show(self._rows[event.cursor_row])

    def update_alerts(self, alerts: list[Any]) -> None:
        """Replaces the rows with the newest alerts, when there are new ones."""
        shown = (len(alerts), alerts[-1] if alerts else None)
        if shown == self._shown:
            return
        self._shown = shown
        self.clear()
        styles = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
        self._rows = list(reversed(alerts[-200:]))
        for alert in self._rows:
            style = styles.get(getattr(alert, "severity", "info"), "")
            rank = getattr(alert, "rank", None)
            step = getattr(alert, "step", None)
            self.add_row(
                Text(getattr(alert, "severity", "")[:4].upper(), style=style),
                Text("-" if step is None else str(step)),
                Text("-" if rank is None else str(rank)),
                Text(inert(getattr(alert, "message", ""), 300), style=style),
            )
