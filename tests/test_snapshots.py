"""What a person sees, on fixed data, at every terminal size the layout knows, and across a resize.

Each snapshot is also checked as text: every visible chart draws data, and its tick labels are
printed whole, apart from their neighbours (what plotext printed equals the labels lmtop set).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lmtop.tui.app import LmtopApp
from runs import write_run
from test_app import app_for, loaded, visible_charts
from test_charts import ANSI, plot_labels

DATA = set(chr(c) for c in range(0x2801, 0x2900)) | {"•"}  # braille dots, plotext's dot marker


@pytest.fixture
def snapshot_run(tmp_path: Path) -> Path:
    return write_run(
        tmp_path / "runs", name="snapshot-run", ranks=3, steps=400, extra={250: {"loss": 12.0}}
    )


def assert_readable(app: LmtopApp, charts: int) -> None:
    """``charts`` charts on screen, each with data and labels that do not run together."""
    shown = visible_charts(app)
    assert len(shown) == charts, [c.id for c in shown]
    for chart in shown:
        assert chart.picture is not None and not chart.picture.empty, chart.id
        width, height = chart.size
        assert chart.picture is not None and chart._drawn_with is not None
        assert chart._drawn_with[-2:] == (width, height), f"{chart.id} drawn for another size"
        text = chart.plt.build()
        x_ticks, y_ticks = chart.axes
        xs, ys = plot_labels(text)
        assert xs == x_ticks.labels and len(xs) >= 2, (chart.id, xs)
        assert ys == list(reversed(y_ticks.labels)) and len(ys) >= 2, (chart.id, ys)
        lines = ANSI.sub("", text).splitlines()[1:-2]
        body = "".join(re.split("[│┤├]", line, maxsplit=1)[-1] for line in lines)
        assert DATA & set(body), f"{chart.id} draws no data"


async def settle(app: LmtopApp, pilot) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        await pilot.pause()
    app.redraw(force=True)
    await pilot.pause()


@pytest.mark.parametrize(
    ("size", "charts"), [((60, 20), 1), ((80, 24), 2), ((120, 40), 4), ((200, 60), 6)]
)
def test_screen(snap_compare, snapshot_run: Path, size: tuple[int, int], charts: int) -> None:  # type: ignore[no-untyped-def]
    app = app_for(snapshot_run)

    async def ready(pilot) -> None:  # type: ignore[no-untyped-def]
        await loaded(app, pilot, 400 * 7 * 3)
        await settle(app, pilot)
        assert_readable(app, charts)

    assert snap_compare(app, terminal_size=size, run_before=ready)


@pytest.mark.parametrize("back", [False, True])
def test_resize_from_140x44_to_80x24_and_back(snap_compare, snapshot_run: Path, back: bool) -> None:  # type: ignore[no-untyped-def]
    app = app_for(snapshot_run)

    async def ready(pilot) -> None:  # type: ignore[no-untyped-def]
        await loaded(app, pilot, 400 * 7 * 3)
        await settle(app, pilot)
        assert_readable(app, 4)
        await pilot.resize_terminal(80, 24)
        await settle(app, pilot)
        assert_readable(app, 2)
        if back:
            await pilot.resize_terminal(140, 44)
            await settle(app, pilot)
            assert_readable(app, 4)

    assert snap_compare(app, terminal_size=(140, 44), run_before=ready)
