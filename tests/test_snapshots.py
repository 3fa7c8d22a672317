"""What a person sees, on fixed data, at the smallest and a large terminal size."""

from __future__ import annotations

from pathlib import Path

import pytest
from runs import write_run
from test_app import app_for, loaded


@pytest.fixture
def snapshot_run(tmp_path: Path) -> Path:
    return write_run(
        tmp_path / "runs", name="snapshot-run", ranks=3, steps=400, extra={250: {"loss": 12.0}}
    )


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_screen(snap_compare, snapshot_run: Path, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    app = app_for(snapshot_run)

    async def ready(pilot) -> None:  # type: ignore[no-untyped-def]
        await loaded(app, pilot, 400 * 7 * 3)
        app.layout_charts()
        await pilot.pause()
        app.redraw(force=True)
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=ready)
