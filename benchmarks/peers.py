"""The hook's cost against what users would pick instead: W&B, TensorBoard, trackio, MLflow.

    python benchmarks/peers.py [--steps N] [--libs lmtop,wandb,...] [--regimes tight,paced]
                               [--repeat 2] [--json out.json]

The same loop logs the same 8 float scalars per step through each library, in a fresh process
per (library, regime, repetition), configured for local use only:

- ``lmtop``: ``lmtop.hooks.publish`` with no viewer; ``lmtop+viewer``: the same while a real
  ``lmtop --headless`` follows the run live (its stdout goes to a file, its steps counted);
- ``wandb``: ``wandb.log`` in offline mode;
- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter.add_scalar`` per key;
- ``trackio``: ``trackio.log``, local;
- ``mlflow``: ``mlflow.log_metrics`` into a local sqlite store.

Two regimes: ``tight`` (back to back) and ``paced`` (1 ms of sleep between steps, as a training
step would leave the logger's threads time to work). Reported: per-call median, p99 and max in
µs; total time including the final finish/close/flush; the peak resident memory of the process
and every process it started (sampled every 50 ms from outside, and the kernel's own peaks of
the process and its waited-for children); and whether every step was persisted, read back from
what the library wrote. A library that is not installed is skipped, said once.
Optional requirements: ``benchmarks/requirements-peers.txt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _metrics import NAMES  # benchmarks/ is on the path: these run as scripts

LIBRARIES = ("lmtop", "lmtop+viewer", "wandb", "tensorboard", "trackio", "mlflow")
MODULES = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlflow"}
CHILD_TIMEOUT = 600  # seconds for one library's run; MLflow's sqlite store is the slow one
CLOSED = "closed"  # the child's marker: the library is closed, the read-back begins
VIEWER_START_SECONDS = 1.0  # the viewer is up and watching before the run starts
HEADER = (
    "| library | regime | run | median µs | p99 µs | max µs | total s | peak RSS MB | persisted |"
)


def metrics(step: int) -> dict[str, float]:
    """Eight float scalars that change every step."""
    return {name: 1.0 / (step + 1) + index * 0.25 for index, name in enumerate(NAMES)}


# -- the child: one library, one regime -----------------------------------------------------------

# What a library's set-up returns: log(step, metrics), close(), and the steps it persisted.
Setup = tuple[Callable[[int, dict[str, float]], None], Callable[[], None], Callable[[], int]]


def setup_lmtop(folder: Path) -> Setup:
    from lmtop import hooks

    hooks.init(run="bench", dir=folder / "runs")

    def count() -> int:
        steps = set()
        with open(folder / "runs" / "bench" / "rank-0.jsonl", "rb") as lines:
            for line in lines:
                message = json.loads(line)
                if message["kind"] == "metrics":
                    steps.add(message["step"])
        return len(steps)

    return lambda step, m: hooks.publish(m, step=step), hooks.finish, count


def wandb_records(data: bytes) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB.

    (wandb 0.31 ships no Python reader of its own; the format is LevelDB's log: each chunk has a
    4-byte checksum, a 2-byte little-endian length and a type: 1 full, 2 first, 3 middle, 4 last.)
    """
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records


def setup_wandb(folder: Path) -> Setup:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(folder))
    import wandb

    wandb.init(project="bench", dir=str(folder), settings=wandb.Settings(console="off"))

    def count() -> int:
        from wandb.proto import wandb_internal_pb2

        (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
        steps = set()
        for data in wandb_records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                steps.add(record.history.step.num)
        return len(steps)

    def close() -> None:
        # finish() can return while the wandb-core service still writes the last records (2 of
        # 500 steps were missing when read right after it): teardown() waits for the service.
        wandb.finish()
        wandb.teardown()

    return lambda step, m: wandb.log(m, step=step), close, count


def setup_tensorboard(folder: Path) -> Setup:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder / "tb"))

    def log(step: int, m: dict[str, float]) -> None:
        for name, value in m.items():
            writer.add_scalar(name, value, step)

    def count() -> int:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        return min(len({e.step for e in events.Scalars(name)}) for name in NAMES)

    return log, writer.close, count


def setup_trackio(folder: Path) -> Setup:
    os.environ["TRACKIO_DIR"] = str(folder / "trackio")
    import trackio

    trackio.init(project="bench", name="bench")

    def count() -> int:
        import sqlite3

        (db,) = (folder / "trackio").glob("*.db")
        with sqlite3.connect(db) as connection:
            return int(connection.execute("select count(distinct step) from metrics").fetchone()[0])

    return lambda step, m: trackio.log(m, step=step), trackio.finish, count


def setup_mlflow(folder: Path) -> Setup:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    run = mlflow.start_run()

    def count() -> int:
        client = mlflow.tracking.MlflowClient()
        history = [client.get_metric_history(run.info.run_id, name) for name in NAMES]
        return min(len({m.step for m in metric}) for metric in history)

    return lambda step, m: mlflow.log_metrics(m, step=step), mlflow.end_run, count


SETUPS: dict[str, Callable[[Path], Setup]] = {
    "lmtop": setup_lmtop,
    "lmtop+viewer": setup_lmtop,
    "wandb": setup_wandb,
    "tensorboard": setup_tensorboard,
    "trackio": setup_trackio,
    "mlflow": setup_mlflow,
}


def child(library: str, regime: str, steps: int, folder: Path) -> dict[str, Any]:
    """Runs one library's loop in this process; returns its figures."""
    log, close, count = SETUPS[library](folder)
    pause = 0.001 if regime == "paced" else 0.0
    calls = []
    clock = time.perf_counter_ns
    started = clock()
    for step in range(steps):
        m = metrics(step)
        before = clock()
        log(step, m)
        calls.append(clock() - before)
        if pause:
            time.sleep(pause)
    close()
    total = (clock() - started) / 1e9
    # The peaks are taken before the read-back, whose own memory is the benchmark's: the kernel's
    # peaks of this process and of the helpers it waited for (a sum: they may have run at the
    # same time; a short helper may end between two samples from outside), and the marker file
    # stops the sampling from outside.
    own_peak_mb = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    ) / 1024
    (folder / CLOSED).touch()
    calls.sort()
    return {
        "median_us": calls[len(calls) // 2] / 1000,
        "p99_us": calls[int(len(calls) * 0.99)] / 1000,
        "max_us": calls[-1] / 1000,
        "total_s": total,
        "persisted": count(),
        "own_peak_mb": own_peak_mb,
    }


# -- the parent: every library, regime and repetition ---------------------------------------------


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and every process below it (from /proc)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    stack.extend(int(child) for child in f.read().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def installed(library: str) -> bool:
    module = MODULES.get(library)
    return module is None or importlib.util.find_spec(module) is not None


def measure(library: str, regime: str, steps: int) -> dict[str, Any]:
    """One run of one library in a fresh process (and its viewer, for lmtop+viewer)."""
    folder = Path(tempfile.mkdtemp(prefix="lmtop-peers-"))
    runtime = Path(tempfile.mkdtemp(prefix="lp", dir="/tmp"))  # ipc paths: keep them short
    env = dict(os.environ, LMTOP_RUNTIME_DIR=str(runtime), LMTOP_DIR=str(folder / "runs"))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LMTOP_RUN", "LMTOP_DISABLE"):
        env.pop(name, None)
    viewer = None
    if library == "lmtop+viewer":
        # `lmtop --headless FOLDER` follows the runs in the folder live; named rather than found
        # in the registry so that a run shorter than one registry scan is still seen.
        (folder / "runs").mkdir()
        with open(folder / "viewer.jsonl", "wb") as out:
            viewer = subprocess.Popen(
                [sys.executable, "-m", "lmtop.tui", "--headless", str(folder / "runs")],
                env=env,
                stdout=out,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(VIEWER_START_SECONDS)
    try:
        # Memory is sampled from here, not by a thread in the measured process: a sampler there
        # would take that process's interpreter lock and inflate the very calls being timed.
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", library, regime, str(steps), str(folder)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        peak = viewer_peak = 0
        deadline = time.monotonic() + CHILD_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if not (folder / CLOSED).exists():
                peak = max(peak, tree_rss(process.pid))
            if viewer is not None:
                viewer_peak = max(viewer_peak, tree_rss(viewer.pid))
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.communicate()
            return {"error": [f"over {CHILD_TIMEOUT} s"]}
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            return {"error": stderr.strip().splitlines()[-1:] or ["failed"]}
        result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
        result["peak_rss_mb"] = max(peak / 2**20, result.pop("own_peak_mb"))
        if viewer is not None:
            viewer.wait(timeout=60)  # it exits by itself once the run has ended
            lines = (folder / "viewer.jsonl").read_bytes().splitlines()
            seen = {json.loads(line).get("step") for line in lines if b'"kind":"metrics"' in line}
            result["viewer_saw"] = len(seen)
            result["viewer_peak_rss_mb"] = viewer_peak / 2**20
        return result
    finally:
        if viewer is not None and viewer.poll() is None:
            viewer.kill()
            viewer.wait()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


def version(library: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    name = "lmtop" if library.startswith("lmtop") else library
    try:
        return dist_version(name)
    except PackageNotFoundError:
        return "?"


def lmtop_source() -> str:
    """The commit of the lmtop being measured, and whether its hook has uncommitted changes."""
    import lmtop.hooks

    where = Path(lmtop.hooks.__file__).resolve().parent
    git = ["git", "--no-optional-locks", "-C", str(where)]  # reads only: no index refresh
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "."], capture_output=True)
    except OSError:
        return "?"
    if head.returncode != 0:
        return "?"
    return head.stdout.strip() + (" + uncommitted changes in hooks/" if dirty.returncode else "")


def complete(row: dict[str, Any]) -> bool:
    """Whether the run persisted every step (and its viewer, if any, saw every step)."""
    r = row["result"]
    return (
        "error" not in r
        and r["persisted"] == row["steps"]
        and r.get("viewer_saw", row["steps"]) == row["steps"]
    )


def table(rows: list[dict[str, Any]]) -> str:
    out = [HEADER, "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        r = row["result"]
        if "error" in r:
            out.append(
                f"| {row['library']} | {row['regime']} | {row['run']} | error: {r['error'][0]} |"
            )
            continue
        kept = f"{r['persisted']}/{row['steps']}"
        if "viewer_saw" in r:
            kept += f" (viewer saw {r['viewer_saw']}, {r['viewer_peak_rss_mb']:.0f} MB)"
        out.append(
            f"| {row['library']} | {row['regime']} | {row['run']} | {r['median_us']:.1f} | "
            f"{r['p99_us']:.1f} | {r['max_us']:.0f} | {r['total_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {kept} |"
        )
    return "\n".join(out)


def ratios(rows: list[dict[str, Any]], regime: str = "paced") -> list[str]:
    """Each library's median against lmtop's (the median of each one's runs)."""
    medians: dict[str, list[float]] = {}
    for row in rows:
        if row["regime"] == regime and "error" not in row["result"]:
            medians.setdefault(row["library"], []).append(row["result"]["median_us"])
    mid = {name: sorted(v)[(len(v) - 1) // 2] for name, v in medians.items()}  # the lower middle
    if "lmtop" not in mid:
        return []
    return [
        f"{regime} median, {name} / lmtop: {value / mid['lmtop']:.1f}x "
        f"({value:.1f} µs / {mid['lmtop']:.1f} µs)"
        for name, value in mid.items()
        if name != "lmtop"
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        library, regime, steps, folder = args[1], args[2], int(args[3]), Path(args[4])
        print(json.dumps(child(library, regime, steps, folder)), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libs", default=",".join(LIBRARIES), help="comma-separated")
    parser.add_argument("--regimes", default="tight,paced", help="tight, paced or both")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, to show the noise")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    options = parser.parse_args(args)
    libraries = options.libs.split(",")
    regimes = options.regimes.split(",")
    for name in libraries:
        if name not in SETUPS:
            parser.error(f"unknown library {name!r}; known: {', '.join(LIBRARIES)}")
    for name in regimes:
        if name not in ("tight", "paced"):
            parser.error(f"unknown regime {name!r}; known: tight, paced")
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} cores {platform.machine()}, Python {sys.version.split()[0]}, "
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    versions: dict[str, str] = {}
    for name in libraries:
        if installed(name):
            versions[name] = version(name)
            if name.startswith("lmtop"):
                versions[name] += f" ({lmtop_source()})"
            print(f"{name} {versions[name]}", flush=True)
        else:
            print(
                f"skipped {name}: not installed (pip install -r benchmarks/requirements-peers.txt)",
                flush=True,
            )
    rows: list[dict[str, Any]] = []
    # Repetitions outermost: a burst of load elsewhere on the machine hits one run of each
    # library rather than both runs of one.
    for run in range(1, options.repeat + 1):
        for regime in regimes:
            for name in versions:
                result = measure(name, regime, options.steps)
                row = {
                    "library": name,
                    "regime": regime,
                    "run": run,
                    "steps": options.steps,
                    "result": result,
                }
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    order = {name: i for i, name in enumerate(LIBRARIES)}
    rows.sort(key=lambda r: (regimes.index(r["regime"]), order[r["library"]], r["run"]))
    load_end = os.getloadavg()
    print()
    print(table(rows))
    print()
    for regime in regimes:
        for line in ratios(rows, regime):
            print(line)
    failed = [r for r in rows if not complete(r)]
    if failed:
        for r in failed:
            print(f"NOT PERSISTED: {r['library']} {r['regime']} run {r['run']}: {r['result']}")
    else:
        print(f"persisted: every step of every run ({len(rows)} runs)")
    print(f"load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    if options.json:
        report = {
            "machine": {
                "cores": os.cpu_count(),
                "arch": platform.machine(),
                "python": sys.version.split()[0],
                "loadavg_start": load,
                "loadavg_end": load_end,
            },
            "versions": versions,
            "rows": rows,
        }
        Path(options.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
