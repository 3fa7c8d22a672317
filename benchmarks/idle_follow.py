"""What following many unfinished, idle ranks costs: CPU of a Follower whose ranks publish nothing.

    .venv/bin/python benchmarks/idle_follow.py --ranks 10000 --seconds 10

Writes one run of N rank files (each a start and one step, no end, its pid this process: alive)
and polls it as ``lmtop --headless`` would, printing the share of one core the poll loop used.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from lmtop.hooks import schema
from lmtop.tui.follow import Follower


def write(folder: Path, ranks: int) -> Path:
    run = folder / "idle"
    run.mkdir(parents=True)
    for rank in range(ranks):
        start = {"v": 1, "run": "idle", "rank": rank, "world": ranks, "seq": 0, "t": 1.0,
                 "kind": "start", "step": None, "info": {"pid": os.getpid(), "host": os.uname().nodename}}  # fmt: skip
        step = {**start, "seq": 1, "kind": "metrics", "step": 0, "m": {"loss": 1.0}}
        del step["info"]
        (run / f"rank-{rank}.jsonl").write_bytes(schema.encode(start) + schema.encode(step))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run = write(Path(folder), args.ranks)
        follower = Follower([str(run)], live=False)
        while not follower.runs or follower.catching_up or not follower._scanned_once:
            follower.poll(0)
        time.sleep(1.0)
        follower.poll(0)  # the history is read; from here on nothing changes
        cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        while time.monotonic() - wall0 < args.seconds:
            follower.poll(0.1)
        cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - wall0
        used = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        print(f"{args.ranks} idle ranks: {100 * used / wall:.1f}% of one core while following")


if __name__ == "__main__":
    main()
