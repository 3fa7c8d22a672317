"""Where a chart's ticks go and what they say, for the space the chart has.

plotext picks ticks itself (``0.0 117.5 235.0 352.5``, unevenly spaced y ticks, raw Unix seconds,
labels running together at 80 columns); lmtop hands it its own: round values from
:mod:`.numbers`, as many as fit with a blank between neighbours, labelled the way people read
numbers. Plain Python, so a test checks the labels without a terminal.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from . import numbers

# plotext draws a frame around the plot: one column each side, a row above, and below it the
# x axis and its labels.
FRAME_COLUMNS = 2
FRAME_ROWS = 3
MAX_X_TICKS = 10
MAX_Y_TICKS = 6


@dataclass(frozen=True, slots=True)
class Axis:
    """The ticks of one axis: positions (in the plotted coordinates) and their labels."""

    values: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        """Columns the widest label takes."""
        return max((len(label) for label in self.labels), default=0)


def y_axis(low: float, high: float, rows: int, log: bool = False) -> Axis:
    """Y ticks on distinct rows (``low``/``high`` in log10 when ``log``).

    A blank row between two labels where the plot is tall enough to keep two of them so.
    """
    rows = max(1, rows)
    best = Axis()
    for apart in (2, 1):
        for count in range(min(MAX_Y_TICKS, (rows + apart - 1) // apart), 0, -1):
            axis = _log_ticks(low, high, count) if log else _linear(low, high, count)
            places = [_cell(v, low, high, rows) for v in axis.values]
            if all(b - a >= apart for a, b in itertools.pairwise(places)):
                if len(axis.values) >= 2:
                    return axis
                best = best if best.values else axis
                break
    if rows >= 2 and not log:
        # Too few rows for two round values: the range's own ends, which are never ambiguous.
        ends = [numbers.number(low), numbers.number(high)]
        if ends[0] != ends[1]:
            return Axis([low, high], ends)
    return best


def x_axis(low: float, high: float, columns: int, origin: float | None = None) -> Axis:
    """X ticks whose labels keep two blanks between them: steps, or wall time since ``origin``."""
    columns = max(1, columns)
    for count in range(min(MAX_X_TICKS, columns // 4), 0, -1):
        if origin is None:
            values = numbers.nice_ticks(low, high, count, integer=True)
            labels = numbers.tick_labels(values)
        else:
            values = [origin + t for t in numbers.time_ticks(low - origin, high - origin, count)]
            labels = [numbers.since_start(v - origin) for v in values]
        places = [_cell(v, low, high, columns) for v in values]
        if _fits(places, labels, columns):
            return Axis(values, labels)
    return Axis()


def plot_columns(width: int, y: Axis) -> int:
    """The data columns of a plot ``width`` cells wide whose y labels are ``y``'s."""
    return max(1, width - y.width - FRAME_COLUMNS)


def plot_rows(height: int) -> int:
    """The data rows of a plot ``height`` cells high."""
    return max(1, height - FRAME_ROWS)


def _cell(value: float, low: float, high: float, cells: int) -> int:
    if high <= low:
        return 0
    # Halves: finite ends ±1e308 apart have an infinite difference.
    return round((value / 2 - low / 2) / (high / 2 - low / 2) * (cells - 1))


def _fits(places: list[int], labels: list[str], columns: int) -> bool:
    """Whether centred labels at ``places`` keep two blanks apart and inside the plot's width."""
    for (a, label_a), (b, label_b) in zip(zip(places, labels), zip(places[1:], labels[1:])):
        if b - a < (len(label_a) + len(label_b)) / 2 + 2:
            return False
    # The y labels' column sits left of the plot, so a first label may reach into it; the last
    # must end inside the frame.
    return not places or places[-1] + len(labels[-1]) / 2 <= columns + 1


def _linear(low: float, high: float, count: int) -> Axis:
    values = numbers.nice_ticks(low, high, count)
    return Axis(values, numbers.tick_labels(values))


def _log_ticks(low: float, high: float, count: int) -> Axis:
    """Powers of ten across decades; within about one decade, round values at their log."""
    first, last = math.ceil(low - 1e-9), math.floor(high + 1e-9)
    if last - first >= 1:
        gap = max(1, math.ceil((last - first) / max(1, count - 1)))
        powers = list(range(first, last + 1, gap))
        labels = [f"1e{p}" if p < -2 else numbers.number(10.0**p) for p in powers]
        return Axis([float(p) for p in powers], labels)
    values = numbers.nice_ticks(10.0**low, 10.0**high, count)
    values = [v for v in values if v > 0]
    return Axis([math.log10(v) for v in values], numbers.tick_labels(values))
