"""The viewer's costs: frame time and memory as series grow, first frame, terminal bytes/s.

    python benchmarks/viewer.py            # everything (about two minutes)
    python benchmarks/viewer.py frame 1000000
    python benchmarks/viewer.py first-frame
    python benchmarks/viewer.py terminal [REDRAWS_PER_SECOND]

Frame: one run, one rank, 4 series of N points each, 160x48; the time to compute every visible
chart's picture and build its plotext text (what a redraw costs, without the terminal write).
Memory: resident-set growth per stored point. First frame: time from starting the app (alerts
on, as ``lmtop`` runs it) on a 100,000-step run directory (8 metrics) until every visible chart
has rendered the whole history.
Terminal: bytes the real app writes to its pseudo-terminal per second at the default refresh
(2 per second; also at 4), 120x36 (4 charts), with a simulated rank publishing 40 steps a second.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import resource
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def frame(points: int) -> None:
    """Frame time and bytes per point with ``points`` points in each of 4 series."""
    from lmtop.hooks import schema
    from lmtop.tui.app import LmtopApp
    from lmtop.tui.source import MemorySource
    from lmtop.tui.store import Series
    from lmtop.tui.widgets import Chart

    start = schema.encode(
        {
            "v": 1,
            "run": "bench",
            "rank": 0,
            "world": 1,
            "seq": 0,
            "t": 0.0,
            "kind": "start",
            "step": None,
            "info": {"config": {"max_grad_norm": 1.0}},
        }
    )
    app = LmtopApp(MemorySource([start]))
    names = ("loss", "learning_rate", "grad_norm", "tokens_per_second")
    before = rss_bytes()
    chunk = 65_536  # small batches, as the follower adds them: no big transient lists
    for index, name in enumerate(names):
        series = app.store.series[("memory:bench", 0, name)] = Series()
        app.store.metrics.setdefault("memory:bench", set()).add(name)
        for lo in range(0, points, chunk):
            steps = list(range(lo, min(points, lo + chunk)))
            series.extend(
                steps,
                [s * 0.1 for s in steps],
                [1.0 + ((s * 7919 + index) % 1000) / 1000 for s in steps],
            )
    grown = rss_bytes() - before
    stored = app.store.nbytes()

    async def measure() -> list[float]:
        times = []
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause(0.2)
            for _ in range(12):
                started = time.perf_counter()
                app.redraw(force=True)
                for chart in app.query(Chart):
                    if not chart.has_class("hidden"):
                        chart.render()
                times.append((time.perf_counter() - started) * 1000)
        return times[2:]

    times = asyncio.run(measure())
    total = points * len(names)
    print(
        f"frame  points/series={points:>10,}  frame median {statistics.median(times):6.1f} ms  "
        f"max {max(times):6.1f} ms  store {stored / total:5.1f} B/point  resident {grown / total:5.1f} B/point",
        flush=True,
    )


def first_frame(steps: int = 100_000) -> None:
    """Seconds from starting the app on a ``steps``-step run to the first frame of all of it."""
    from lmtop.hooks import schema
    from lmtop.tui.alert_actions import Alerting
    from lmtop.tui.alert_settings import AlertSettings
    from lmtop.tui.app import LmtopApp
    from lmtop.tui.follow import Follower
    from lmtop.tui.widgets import Chart

    folder = Path(tempfile.mkdtemp(prefix="lmtop-bench-")) / "history"
    folder.mkdir()
    from _metrics import NAMES as names

    with (folder / "rank-0.jsonl").open("wb") as f:
        f.write(
            schema.encode(
                {
                    "v": 1,
                    "run": "history",
                    "rank": 0,
                    "world": 1,
                    "seq": 0,
                    "t": 1.0,
                    "kind": "start",
                    "step": None,
                    "info": {"host": "elsewhere"},
                }
            )
        )
        for step in range(steps):
            m = {name: 1.0 + ((step * 31 + i) % 97) / 97 for i, name in enumerate(names)}
            f.write(
                schema.encode(
                    {
                        "v": 1,
                        "run": "history",
                        "rank": 0,
                        "world": 1,
                        "seq": step + 1,
                        "t": 2.0 + step,
                        "kind": "metrics",
                        "step": step,
                        "m": m,
                    }
                )
            )

    rendered: dict[str, float] = {}  # chart -> when it first rendered the whole history
    render = Chart.render

    def timed_render(chart: Chart) -> object:
        result = render(chart)
        pic = chart.picture
        if pic is not None and pic.lines and max(pic.lines[0].x) >= steps - 1 - steps // 100:
            rendered.setdefault(chart.spec.key, time.perf_counter())
        return result

    Chart.render = timed_render  # type: ignore[method-assign]

    async def measure() -> float:
        started = time.perf_counter()
        source = Follower([str(folder)], follow=True, live=False)
        app = LmtopApp(source, alerts=Alerting(AlertSettings(), source.runs))  # as run_app does
        async with app.run_test(size=(160, 48)) as pilot:
            shown = [c.spec.key for c in app.query(Chart) if not c.has_class("hidden")]
            deadline = time.monotonic() + 30
            while not all(key in rendered for key in shown) and time.monotonic() < deadline:
                await pilot.pause(0.01)
            return max(rendered[key] for key in shown) - started

    seconds = asyncio.run(measure())
    print(f"first frame with a {steps:,}-step history (8 metrics): {seconds:.2f} s", flush=True)


def terminal(seconds: float = 10.0, refresh: float = 2.0) -> None:
    """Bytes per second the real app writes to a 120x36 terminal at ``refresh`` frames/s."""
    folder = tempfile.mkdtemp(prefix="lmtop-bench-")
    publisher = subprocess.Popen(
        [sys.executable, "-m", "lmtop.tui.demo", "--rank-process", "1000000", "1.0"],
        env=dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LMTOP_DIR=folder),
    )
    time.sleep(1.0)
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.pop("COLUMNS", None)
        os.environ.pop("LINES", None)
        os.environ["TERM"] = "xterm-256color"
        os.execv(
            sys.executable,
            [sys.executable, "-m", "lmtop.tui", "--refresh", str(refresh), folder],
        )
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 36, 120, 0, 0))
    total = 0
    warm = time.monotonic() + 3.0  # skip start-up and the first full paint
    end = warm + seconds
    counted = 0
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                total += len(data)
                if time.monotonic() >= warm:
                    counted += len(data)
    finally:
        os.write(fd, b"q")
        time.sleep(1.0)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        publisher.kill()
        publisher.wait()
    print(
        f"terminal output at {refresh:g} redraws/s, 120x36, 4 charts updating: {counted / seconds / 1000:.1f} KB/s",
        flush=True,
    )


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["frame"]:
        frame(int(args[1]))
    elif args[:1] == ["first-frame"]:
        first_frame()
    elif args[:1] == ["terminal"]:
        terminal(refresh=float(args[1]) if len(args) > 1 else 2.0)
    else:
        print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}", flush=True)
        for points in (10_000, 100_000, 1_000_000, 10_000_000):
            subprocess.run([sys.executable, __file__, "frame", str(points)], check=True)
        subprocess.run([sys.executable, __file__, "first-frame"], check=True)
        for refresh in ("2", "4"):
            subprocess.run([sys.executable, __file__, "terminal", refresh], check=True)
        print(
            f"peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB"
        )


if __name__ == "__main__":
    main()
