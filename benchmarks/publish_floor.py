"""What one `publish` cannot go below, in the paced regime of `peers.py` (1 ms between calls).

    python benchmarks/publish_floor.py [--calls 3000]

Times, with the same clock and pacing as `peers.py`, the parts a durable publish is made of:
an empty Python call, encoding a message of 8 floats with orjson, one `os.write` of the encoded
line to an append-only file, both together, and `lmtop.hooks.publish` itself. A publish that
keeps the contract "the line is written to the OS before `publish` returns" costs at least
encode + write; TensorBoard's `add_scalar` queues a protobuf for a thread to write later.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import orjson
from _metrics import NAMES  # benchmarks/ is on the path: this runs as a script


def paced_median_us(call: Callable[[], object], calls: int) -> float:
    """The median time of ``call`` in µs, with 1 ms of sleep before each."""
    taken = []
    for _ in range(calls):
        time.sleep(0.001)
        began = time.perf_counter_ns()
        call()
        taken.append(time.perf_counter_ns() - began)
    taken.sort()
    return taken[len(taken) // 2] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="lmtop-floor-")
    os.environ["LMTOP_DIR"] = folder
    from lmtop import hooks

    metrics = {name: 0.5 + 0.01 * i for i, name in enumerate(NAMES)}
    message = {"v": 1, "run": "floor", "rank": 0, "world": 1, "seq": 1, "t": time.time()}
    message |= {"kind": "metrics", "step": 1, "m": metrics}
    line = orjson.dumps(message) + b"\n"
    fd = os.open(os.path.join(folder, "floor.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    step = iter(range(1 << 62))
    parts: dict[str, Callable[[], object]] = {
        "empty Python call": lambda: None,
        "orjson encode": lambda: orjson.dumps(message),
        "os.write of the line": lambda: os.write(fd, line),
        "encode + write": lambda: os.write(fd, orjson.dumps(message) + b"\n"),
        "lmtop.hooks.publish": lambda: hooks.publish(metrics, step=next(step)),
    }
    for name, call in parts.items():
        print(f"{name:22} {paced_median_us(call, args.calls):6.2f} µs paced median", flush=True)
    hooks.finish()
    os.close(fd)


if __name__ == "__main__":
    main()
