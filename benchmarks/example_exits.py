"""How often a 2-rank CPU example hangs at exit: N launches, each killed if it outlives a limit.

    .venv/bin/python benchmarks/example_exits.py --launches 50 [--example accelerate_loop] [--short]

Each launch is `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` of the
example with its defaults (``--short``: 4 steps), in its own session; one still running after --limit seconds is a
hang (torch's gloo exit deadlock, pytorch/pytorch#56297), killed with its ranks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def launch(example: str, args: list[str], limit: float, folder: str) -> tuple[str, float]:
    """One launch: ("ok" | "failed" | "hung", seconds)."""
    command = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
        str(EXAMPLES / f"{example}.py"), *args,
    ]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", LMTOP_DIR=folder)
    started = time.monotonic()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        code = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _dump_stacks(process.pid)
        for pid in _descendants(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "hung", time.monotonic() - started
    return ("ok" if code == 0 else "failed"), time.monotonic() - started


def _descendants(root: int) -> list[int]:
    """The processes below ``root`` (torchrun starts ranks in sessions of their own)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read()
                parents[int(entry)] = int(raw[raw.rfind(b")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _dump_stacks(root: int) -> None:
    """Where each rank of a hung launch is (py-spy, when installed), on stderr."""
    if shutil.which("py-spy") is None:
        return
    for pid in _descendants(root):
        dump = subprocess.run(
            ["py-spy", "dump", "--native", "--pid", str(pid)], capture_output=True, text=True
        )
        print(f"--- pid {pid}\n{dump.stdout}{dump.stderr}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launches", type=int, default=50)
    parser.add_argument("--example", default="accelerate_loop")
    parser.add_argument("--limit", type=float, default=90.0)
    parser.add_argument(
        "--short", action="store_true", help="accelerate_loop with --steps 4 --eval-every 2"
    )
    args = parser.parse_args()
    example_args = ["--steps", "4", "--eval-every", "2"] if args.short else []
    counts: dict[str, int] = {}
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.launches):
            outcome, seconds = launch(args.example, example_args, args.limit, folder)
            counts[outcome] = counts.get(outcome, 0) + 1
            times.append(seconds)
            print(f"{index + 1:3d} {outcome} {seconds:.1f} s", flush=True)
    ok = [t for t in times if t < args.limit]
    print(
        f"{args.example}: {args.launches} launches, {counts.get('hung', 0)} hung, "
        f"{counts.get('failed', 0)} failed; median {sorted(ok)[len(ok) // 2]:.1f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
