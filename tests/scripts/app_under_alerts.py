"""Drives the real app under Pilot while its worker raises a critical alert on every message.

    python app_under_alerts.py RUN_DIR OUT_DIR [OPENS]

Opens the run as ``lmtop RUN_DIR`` does (following it), redraws, exports and switches smoothing
while the alerts arrive, then quits; OPENS times over. Prints the fewest alerts one opening
received and the exports. Run in its own process by the tests, with
a timeout: a deadlock between the worker and the screen hangs it (and the test says so).
"""

import asyncio
import os
import sys
import time

from lmtop.tui.alert_actions import Alerting
from lmtop.tui.alert_settings import AlertSettings
from lmtop.tui.app import LmtopApp
from lmtop.tui.follow import Follower


async def open_once(run_dir: str) -> tuple[int, int, int]:
    """One opening of the app; returns (alerts, critical alerts, exports) it saw."""
    source = Follower([run_dir])  # as `lmtop RUN_DIR` opens it: following
    app = LmtopApp(source, refresh_hz=20, alerts=Alerting(AlertSettings(), source.runs))
    async with app.run_test(size=(160, 48)) as pilot:
        deadline = time.monotonic() + 60
        exported = 0
        while time.monotonic() < deadline and (len(app.alerts) < 500 or exported < 2):
            app.redraw(force=True)
            await pilot.press("s")
            if len(app.alerts) > 10 * (exported + 1):
                await pilot.press("e")
                exported += 1
            await pilot.pause(0.01)
        await pilot.press("q")
    critical = sum(1 for a in app.alerts if a.severity == "critical")
    return len(app.alerts), critical, exported


async def main(run_dir: str, out_dir: str, opens: int) -> None:
    os.chdir(out_dir)
    seen = [await open_once(run_dir) for _ in range(opens)]
    alerts, critical, exported = min(seen)
    print(f"alerts {alerts} critical {critical} exported {exported}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1))
