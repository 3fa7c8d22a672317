"""The alert engine's cost per metrics message, with every default detector on.

    .venv/bin/python benchmarks/alert_engine.py [--messages 100000] [--repeat 3]

One rank's messages of 8 metrics (a falling noisy loss, a learning rate, a grad norm and five
more), built in memory and fed through ``AlertEngine.feed``; prints µs per message for each
repetition, wall and CPU time (the CPU time is the steadier figure on a shared machine). This is
what the viewer spends per message after a history is painted.
"""

from __future__ import annotations

import argparse
import math
import random
import time

from _metrics import NAMES  # benchmarks/ is on the path: this runs as a script
from lmtop.hooks import schema
from lmtop.tui.alerts import AlertEngine


def messages(count: int) -> list[schema.Message]:
    rng = random.Random(0)
    out = []
    for step in range(count):
        metrics = {name: 1.0 + 0.1 * rng.random() for name in NAMES}
        metrics["loss"] = 2.0 + math.exp(-step / 3000) + rng.gauss(0, 0.03)
        out.append(schema.Message("r", 0, 1, step + 1, float(step), "metrics", step, metrics, {}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    batch = messages(args.messages)
    for _ in range(args.repeat):
        engine = AlertEngine()
        began, cpu = time.perf_counter(), time.process_time()
        for message in batch:
            engine.feed("bench", message)
        taken, used = time.perf_counter() - began, time.process_time() - cpu
        print(
            f"alert engine: {taken / len(batch) * 1e6:.2f} µs per message "
            f"({used / len(batch) * 1e6:.2f} µs of CPU)",
            flush=True,
        )


if __name__ == "__main__":
    main()
