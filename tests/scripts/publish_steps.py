"""A training job stand-in for the tests: publishes known values, one line of progress per step.

    python publish_steps.py STEPS [--metrics 8] [--pace-every 100] [--pace 0.01] [--sleep-after 0]

Rank and world come from RANK/LOCAL_RANK/WORLD_SIZE like under torchrun. After each publish()
returns, the step is written to stdout, so a test that kills the process knows which steps the
hook had accepted.
"""

import argparse
import os
import sys
import time

from lmtop import hooks


def value(rank: int, step: int, index: int) -> float:
    """The value of metric ``index`` at ``step``; a few steps carry NaN and infinities."""
    if index == 0 and step % 1000 == 7:
        return float("nan")
    if index == 1 and step % 1000 == 8:
        return float("inf")
    if index == 2 and step % 1000 == 9:
        return float("-inf")
    return rank * 1_000_000 + step + index / 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("steps", type=int)
    parser.add_argument("--metrics", type=int, default=8)
    parser.add_argument("--pace-every", type=int, default=100)
    parser.add_argument("--pace", type=float, default=0.01)
    parser.add_argument("--sleep-after", type=float, default=0.0, help="then go silent this long")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", 0))
    names = [f"metric_{i}" for i in range(args.metrics)]
    out = sys.stdout.fileno()
    for step in range(args.steps):
        hooks.publish({name: value(rank, step, i) for i, name in enumerate(names)}, step=step)
        os.write(out, b"%d\n" % step)
        if args.pace_every and step % args.pace_every == args.pace_every - 1:
            time.sleep(args.pace)
    time.sleep(args.sleep_after)


if __name__ == "__main__":
    main()
