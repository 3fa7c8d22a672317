"""How the screen is divided for a terminal of a given size: recomputed on every resize.

Plain Python (the app applies the plan), so a test can check every size without a terminal.
A chart needs about 11 rows to show its data between its frame, axis and labels; the charts
that do not fit are reached a page at a time with tab, and the screen says how many there are.
"""

from __future__ import annotations

from dataclasses import dataclass

CHART_MIN_ROWS = 11  # border 2 + plotext's frame and x labels 3 + 6 rows of data
SINGLE_BELOW = (70, 20)  # columns, rows: one chart at a time below either
WIDE_FROM = 200  # columns: three charts a row
SYSTEM_FROM = 140  # columns: the system panel beside the ranks table (narrower: the alerts
# keep the room; at 120 columns they were cut to a dozen characters)
HEADER_AND_FOOTER = 2


@dataclass(frozen=True, slots=True)
class Plan:
    """The division of the screen: charts per row, charts shown, the ranks strip's height."""

    columns: int
    shown: int
    bottom: int  # rows of the ranks table and alerts (a title row, their header, their rows)
    system: bool = False  # the system panel shown

    @property
    def table_rows(self) -> int:
        """Ranks the table shows at once."""
        return max(0, self.bottom - 2)


def plan(width: int, height: int, charts: int, zoomed: bool = False) -> Plan:
    """The layout for a ``width`` x ``height`` terminal with ``charts`` charts."""
    if zoomed:
        return Plan(columns=1, shown=1, bottom=0)
    bottom = 5 if height < 22 else 7 if height < 34 else 10
    if width < SINGLE_BELOW[0] or height < SINGLE_BELOW[1]:
        return Plan(columns=1, shown=1, bottom=bottom)
    system = width >= SYSTEM_FROM
    columns = 3 if width >= WIDE_FROM else 2
    rows = max(1, (height - HEADER_AND_FOOTER - bottom) // CHART_MIN_ROWS)
    shown = max(1, min(charts, columns * rows))
    return Plan(columns=min(columns, shown), shown=shown, bottom=bottom, system=system)


def page(charts: int, shown: int, focused: int) -> range:
    """The indices shown when ``shown`` of ``charts`` fit: the page holding ``focused``."""
    first = (focused // shown) * shown
    if first + shown > charts:  # the last page is full too, ending with the last chart
        first = max(0, charts - shown)
    return range(first, first + shown)
