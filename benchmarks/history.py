"""A multi-rank job's whole history: first frame, app memory, headless time and peak memory.

    python benchmarks/history.py make DIR RANKS STEPS      # write a run with the real hook
    python benchmarks/history.py first-frame DIR [--cold] [--readers=N] [--frame-only]
    python benchmarks/history.py headless DIR [--no-alerts]
    python benchmarks/history.py all RANKS STEPS [REPEATS] # make in /tmp, measure, delete
    python benchmarks/history.py live [RANKS] [SECONDS]    # the app's CPU, ranks publishing live
    python benchmarks/history.py speed [SECONDS]           # this machine's speed in this sitting

``make`` starts RANKS processes, each a rank of one launch (``RANK``, ``WORLD_SIZE``,
``LMTOP_DIR``, ``LMTOP_RUN``), that call ``hooks.publish`` STEPS times with 10 metrics, as a
training loop would. ``first-frame`` opens the app (alerts on, the columnar cache on, as
``lmtop`` runs it) in a fresh process and prints the seconds until every visible chart shows the
last step, and the process's resident memory then and once the alerts over the history are
computed (after the frame, from the run files read again). ``--cold`` deletes the cache first,
``--readers=N`` sets the worker processes reading long rank files (default 2, 0: none), and
``--frame-only`` stops at the first frame. ``all`` measures a cold first frame (which writes
the cache) and then one from the cache. ``headless`` runs
``lmtop --headless --no-follow RUN > /dev/null`` and prints its wall time, peak RSS (its own; with its workers, PSS) and CPU.
``live`` starts ``lmtop demo``'s simulated ranks (40 steps a second each, through the real hook)
and the app in a 160x48 pseudo-terminal, and prints the app's CPU use from ``/proc/PID/stat``
and its resident memory from the first paint on, each minute.
``speed`` times a fixed loop of plain Python (a million additions) every half second and prints
the fastest, median and slowest time: a shared VM's speed moves from minute to minute (on the
2-core VM of ``benchmarks/README.md``, 35-118 ms within 10 s), and every figure above is CPU
bound, so a figure is worth comparing only with the sitting's speed beside it.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _metrics import NAMES as EIGHT  # benchmarks/ is on the path of its scripts

NAMES = (*EIGHT, "eval_loss", "memory_reserved_gb")  # ten metrics a step


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores, {platform.machine()}, Python {sys.version.split()[0]}, "
        f"load {load[0]:.1f}/{load[1]:.1f}"
    )


def rank_process(steps: int) -> None:
    """One rank: STEPS calls of ``hooks.publish``, as a training loop makes them."""
    from lmtop import hooks

    rank = int(os.environ["RANK"])
    for step in range(steps):
        x = (step * 7919 + rank * 104729) % 1000 / 1000
        hooks.publish({name: 1.0 + x / (i + 1) for i, name in enumerate(NAMES)}, step=step)
    hooks.finish()


def make(folder: Path, ranks: int, steps: int) -> Path:
    """Writes one run of ``ranks`` processes; returns the run directory."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"hist-{ranks}x{steps}"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "rank", str(steps)],
            env=dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(ranks),
                LMTOP_DIR=str(folder),
                LMTOP_RUN=name,
            ),
        )
        for rank in range(ranks)
    ]
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a rank failed: {proc.returncode}")
    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    size = sum(f.stat().st_size for f in run.iterdir())
    print(f"made {run}: {ranks} ranks x {steps:,} steps, {size / 1e6:.0f} MB", flush=True)
    return run


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def first_frame(run: Path, readers: int, cold: bool, frame_only: bool = False) -> None:
    """Seconds until every visible chart shows the whole history; resident memory.

    ``readers`` worker processes read long rank files (0: none, all in this process);
    ``cold`` deletes the columnar cache first (the app writes it again once the history is
    read), else whatever cache is there is used. ``frame_only``: stop at the first frame
    (do not wait for the alerts over the history)."""
    if cold:
        for path in run.glob("rank-*.cols"):
            path.unlink()
    from lmtop.tui import collector
    from lmtop.tui.alert_actions import Alerting
    from lmtop.tui.alert_settings import AlertSettings
    from lmtop.tui.app import LmtopApp
    from lmtop.tui.follow import Follower
    from lmtop.tui.widgets import Chart

    collector.settle()  # as the lmtop command does once it has imported the app
    last = max(
        int(line.split(b'"step":')[1].split(b",")[0])
        for f in run.glob("rank-*.jsonl")
        for line in f.read_bytes()[-4096:].splitlines()[-20:]
        if b'"kind":"metrics"' in line
    )
    # Every metrics point of every rank: a frame counts once the store holds them all (a frame
    # drawn while some ranks are still being read shows the last step of the others).
    points = sum(
        len(NAMES) * f.read_bytes().count(b'"kind":"metrics"') for f in run.glob("rank-*.jsonl")
    )
    rendered: dict[str, float] = {}
    render = Chart.render
    stores: list[Any] = []

    def timed_render(chart: Chart) -> object:
        result = render(chart)
        pic = chart.picture
        if (
            pic is not None
            and pic.lines
            and stores
            and stores[0].points >= points
            and max(max(line.x) for line in pic.lines) >= last - last // 100
        ):
            rendered.setdefault(chart.spec.key, time.perf_counter())
        return result

    Chart.render = timed_render  # type: ignore[method-assign]

    async def measure() -> None:
        started = time.perf_counter()
        source = Follower([str(run)], follow=True, live=False, cache=True, readers=readers)
        engine = Alerting(AlertSettings(), source.runs)
        app = LmtopApp(source, alerts=engine)  # as run_app does
        stores.append(app.store)
        async with app.run_test(size=(160, 48)) as pilot:
            shown = [c.spec.key for c in app.query(Chart) if not c.has_class("hidden")]
            deadline = time.monotonic() + 300
            while not all(key in rendered for key in shown) and time.monotonic() < deadline:
                await pilot.pause(0.01)
            seconds = max(rendered[key] for key in shown) - started
            at_frame = rss_mb()
            if frame_only:
                print(
                    f"first frame ({readers} readers, {'cold' if cold else 'cache'}) "
                    f"{seconds:.2f} s; RSS {at_frame:.0f} MB then",
                    flush=True,
                )
                return
            # Alerts over the history come after the first frame: wait for the worker to drain.
            while time.monotonic() < deadline:
                await pilot.pause(0.5)
                if not source.catching_up and not app.catching_up and not app.alerts_owed:
                    await pilot.pause(1.0)
                    break
            done = time.perf_counter() - started
            print(
                f"first frame ({readers} readers, {'cold' if cold else 'cache'}) {seconds:.2f} s; RSS {at_frame:.0f} MB then, "
                f"{rss_mb():.0f} MB at {done:.1f} s (alerts computed); "
                f"{app.store.points:,} points stored",
                flush=True,
            )

    asyncio.run(measure())


def _tree_pss_kb(pid: int) -> int:
    """The memory of a process and its children together, in KB: their proportional set sizes
    (a page shared by n of them counted 1/n in each; a forked worker shares the viewer's)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for each in (pid, *map(int, children)):
        try:
            rollup = Path(f"/proc/{each}/smaps_rollup").read_text()
        except OSError:  # gone in between
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total


def headless(run: Path, alerts: bool) -> None:
    """Wall time and peak RSS of ``lmtop --headless --no-follow``."""
    command = [sys.executable, "-m", "lmtop.tui", "--headless", "--no-follow", str(run)]
    if not alerts:
        command.insert(-1, "--no-alerts")
    started = time.perf_counter()
    own = 0.0  # the viewer's own CPU seconds, last read from /proc (every 20 ms)
    together = 0  # the most memory of the viewer and its workers at once (PSS), in KB
    polls = 0
    tick = os.sysconf("SC_CLK_TCK")
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(command, stdout=devnull)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                own = max(own, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
                polls += 1
                if polls % 10 == 0:  # smaps_rollup walks page tables: not at every poll
                    together = max(together, _tree_pss_kb(proc.pid))
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(0.02)
    seconds = time.perf_counter() - started
    total = usage.ru_utime + usage.ru_stime  # the viewer's and its history workers'
    print(
        f"headless{'' if alerts else ' --no-alerts'}: {seconds:.2f} s, "
        f"peak RSS {usage.ru_maxrss / 1024:.0f} MB, with its workers {together / 1024:.0f} MB PSS "
        f"(exit {os.waitstatus_to_exitcode(status)}); "
        f"CPU {own:.1f} s in the viewer, {max(0.0, total - own):.1f} s in its history workers",
        flush=True,
    )


def live(ranks: int = 16, seconds: float = 20.0) -> None:
    """Share of one core the app uses while ``ranks`` ranks publish 40 steps a second."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    from lmtop.tui.demo import start_ranks, stop

    folder = tempfile.mkdtemp(prefix="lmtop-live-")
    procs = start_ranks(ranks, 10_000_000, 1.0, folder)
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.pop("COLUMNS", None)
        os.environ.pop("LINES", None)
        os.environ["TERM"] = "xterm-256color"
        os.execv(sys.executable, [sys.executable, "-m", "lmtop.tui", folder])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 48, 160, 0, 0))

    def cpu_seconds() -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    written = [0]  # bytes the app wrote to its terminal

    def drain(until: float) -> None:
        while time.monotonic() < until:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    written[0] += len(os.read(fd, 1 << 16))
                except OSError:
                    return

    def rss_mb() -> float:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024

    try:
        drain(time.monotonic() + 5.0)  # start-up and the first paint
        before, started, wrote = cpu_seconds(), time.monotonic(), written[0]
        resident = [rss_mb()]
        while time.monotonic() < started + seconds:  # the resident memory each minute
            drain(min(started + seconds, time.monotonic() + 60.0))
            resident.append(rss_mb())
        elapsed = time.monotonic() - started
        used = (cpu_seconds() - before) / elapsed
        output = (written[0] - wrote) / elapsed / 1000
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        stop(procs)
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"live: {ranks} ranks x 40 steps/s, the app uses {used:.1%} of a core and writes "
        f"{output:.1f} KB/s to its terminal; resident "
        + " -> ".join(f"{mb:.0f}" for mb in resident)
        + " MB (each minute)",
        flush=True,
    )


def speed(seconds: float = 20.0) -> None:
    """The fastest, median and slowest time of a fixed pure-Python loop over ``seconds``."""
    times = []
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        began = time.process_time()
        total = 0
        for number in range(1_000_000):
            total += number
        times.append(time.process_time() - began)
        time.sleep(0.5)
    times.sort()
    print(
        f"speed: a million additions take {times[0] * 1e3:.0f} / {times[len(times) // 2] * 1e3:.0f}"
        f" / {times[-1] * 1e3:.0f} ms (fastest / median / slowest of {len(times)}, "
        f"{seconds:.0f} s); {machine()}",
        flush=True,
    )


def main() -> None:
    args = sys.argv[1:]
    if args[0] == "rank":
        rank_process(int(args[1]))
    elif args[0] == "make":
        make(Path(args[1]), int(args[2]), int(args[3]))
    elif args[0] == "first-frame":
        readers = next((int(a.split("=")[1]) for a in args if a.startswith("--readers=")), 2)
        first_frame(Path(args[1]), readers, "--cold" in args, "--frame-only" in args)
    elif args[0] == "headless":
        headless(Path(args[1]), "--no-alerts" not in args)
    elif args[0] == "live":
        live(*(int(a) for a in args[1:2]), *(float(a) for a in args[2:3]))
    elif args[0] == "speed":
        speed(*(float(a) for a in args[1:2]))
    elif args[0] == "all":
        ranks, steps = int(args[1]), int(args[2])
        repeats = int(args[3]) if len(args) > 3 else 1
        print(f"machine: {machine()}", flush=True)
        folder = Path(tempfile.mkdtemp(prefix="lmtop-history-"))
        try:
            run = make(folder, ranks, steps)
            for _ in range(repeats):
                for how in ("--cold", "--cached"):
                    command = [sys.executable, __file__, "first-frame", str(run), how]
                    subprocess.run(command, check=True)
                headless(run, alerts=False)
                headless(run, alerts=True)
        finally:
            shutil.rmtree(folder)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
