"""Training-loop stand-ins for the hook's property tests; each prints what the test checks.

python scenario.py NAME [ARGS]
"""

import json
import os
import sys
import time

from lmtop import hooks

METRICS = {f"m{i}": float(i) for i in range(8)}


def loop(steps: int) -> None:
    """A training loop that must go on whatever lmtop meets."""
    for step in range(steps):
        hooks.publish(METRICS, step=step)
    print(json.dumps({"steps": steps, "problems": hooks.stats()}), flush=True)


def garbage() -> None:
    """Everything a careless caller could hand to publish(), then a normal step."""

    class Weird:
        def item(self) -> float:
            raise RuntimeError("no")

    cases = [
        None,
        "loss",
        42,
        [1, 2],
        {"a": None},
        {"a": "text"},
        {"nested": {"deeper": {"x": 1.0}}},
        {"huge": 10**40},
        {i: float(i) for i in range(100_000)},
        {"x" * 500: 1.0},
        {"obj": object()},
        {"weird": Weird()},
        {(1, 2): 3.0},
        {"bytes": b"\x00\xff"},
    ]
    for case in cases:
        hooks.publish(case)  # type: ignore[arg-type]
    hooks.publish({"ok": 1.0}, step="seven")  # type: ignore[arg-type]
    hooks.publish({"ok": 2.0}, step=object())  # type: ignore[arg-type]
    hooks.event(object())  # type: ignore[arg-type]
    hooks.publish({"last": 1.0}, step=100)
    print(json.dumps({"problems": hooks.stats()}), flush=True)


def exit_timing(steps: int) -> None:
    """Waits a moment (for a viewer to connect and be frozen), publishes, then reports when
    main ended so the parent can time the exit."""
    hooks.publish(METRICS, step=0)
    time.sleep(1.5)
    loop(steps)
    print(json.dumps({"main_ended": time.time()}), flush=True)


def forks(steps: int) -> None:
    """Publishes around children that publish too, as DataLoader workers might."""
    for step in range(steps):
        hooks.publish(METRICS, step=step)
        if step in (10, 20):
            pid = os.fork()
            if pid == 0:
                hooks.publish({"from_child": 1.0}, step=999_999)
                if step == 10:
                    os._exit(0)  # how multiprocessing ends a worker
                sys.exit(0)  # runs atexit handlers: must not end the parent's run
            os.waitpid(pid, 0)
    print(json.dumps({"steps": steps, "problems": hooks.stats()}), flush=True)


def crash() -> None:
    """An uncaught exception in the training loop."""
    hooks.publish({"loss": 1.0}, step=0)
    raise ValueError("loss exploded at step 0")


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    {"loop": loop, "garbage": garbage, "exit_timing": exit_timing, "forks": forks, "crash": crash}[
        name
    ](*map(int, args))
