"""The follower's cost per line by the shape of a rank file, in bulk and line by line.

    .venv/bin/python benchmarks/poll_shapes.py [--lines 50000] [--repeat 3]

``Follower.poll`` reads files for ``lmtop --headless``, the alert engine's replay of a history
and every live rank's file. It takes runs of plain metrics lines in bulk (``tui/bulk.py``) and
every other line by the general path. Each case writes one rank file of a shape met in real
runs and reads it to its end, in bulk and then line by line (``follow.PLAIN_RUNS`` off, the
tests' reference), and prints the best CPU time per line of each:

- ``plain``: 10 float metrics a step (what the hook writes for most loops);
- ``int metric``: the same and an integer one (``tokens_seen``), as the hook writes integers;
- ``alternating``: every other line has one more metric (two publish calls a step);
- ``nan``: a NaN in every line (a diverged run: the hook writes the ``"NaN"`` token);
- ``behind live``: the plain file read after live frames applied every line (a live rank's
  file, read every 1-2 s for a lost frame; nothing in it is new).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from _metrics import NAMES  # benchmarks/ is on the path: this runs as a script
from lmtop.tui import follow
from lmtop.tui.follow import Follower

SHAPES = ("plain", "int metric", "alternating", "nan", "behind live")


def write(path: Path, shape: str, lines: int) -> None:
    names = (*NAMES, "eval_loss", "memory_reserved_gb")
    t0 = 1.8e9
    with path.open("wb") as file:
        for step in range(lines):
            m: dict[str, Any] = {name: 1.0 + (step % 97) / (i + 7) for i, name in enumerate(names)}
            if shape == "int metric":
                m["tokens_seen"] = 4096 * step
            elif shape == "alternating" and step % 2:
                m["eval_accuracy"] = 0.5
            elif shape == "nan":
                m["loss"] = "NaN"
            message = {
                "v": 1, "run": "r", "rank": 0, "world": 1, "seq": step, "t": t0 + step * 0.1,
                "kind": "metrics", "step": step, "m": m,
            }  # fmt: skip
            file.write(orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE))


def read(run_dir: Path, shape: str, lines: int) -> float:
    """CPU seconds per line to read the rank file to its end."""
    follower = Follower([str(run_dir)], follow=False, live=False)
    if shape == "behind live":
        follower.poll(0)  # finds the run, and reads its first chunk: not timed
        (run,) = follower.runs.values()
        rank = run.ranks[0]
        rank.applied = 1 << 40  # as if live frames had brought every line already
        first = rank.file_seq
        started = time.process_time()
        while follower._read(run, rank, []):
            pass
        return (time.process_time() - started) / (rank.file_seq - first)
    started = time.process_time()
    while not follower.done:
        follower.poll(0)
    return (time.process_time() - started) / lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} cores, {platform.machine()}, Python {sys.version.split()[0]}, load {load:.1f}"
    )
    print(f"{'shape':<12} {'bulk µs/line':>13} {'line by line':>13} {'ratio':>6}")
    with tempfile.TemporaryDirectory(prefix="lmtop-shapes-") as folder:
        for shape in SHAPES:
            run_dir = Path(folder) / shape.replace(" ", "-")
            run_dir.mkdir()
            write(
                run_dir / "rank-0.jsonl", "plain" if shape == "behind live" else shape, args.lines
            )
            best = {True: math.inf, False: math.inf}
            read(run_dir, shape, args.lines)  # the first read pays for the imports
            for _ in range(args.repeat):  # the two ways alternate: the machine's moods hit both
                for plain_runs in (True, False):
                    follow.PLAIN_RUNS = plain_runs
                    best[plain_runs] = min(best[plain_runs], read(run_dir, shape, args.lines))
            follow.PLAIN_RUNS = True
            bulk, general = best[True] * 1e6, best[False] * 1e6
            print(f"{shape:<12} {bulk:>13.2f} {general:>13.2f} {bulk / general:>6.2f}")


if __name__ == "__main__":
    main()
