"""Step time of ``examples/trainer_lora.py`` with and without ``LmtopCallback``, in one run.

    python benchmarks/callback_overhead.py [--rounds 5] [--steps 150] [--json out.json]

Each round trains the example twice from the same seed, once with the callback and once without,
alternating which goes first; a timing callback, present in both, stamps the end of every
optimizer step. The first ``--skip`` steps of each training are left out (warm-up), evaluation
and checkpoints are off (they are not steps). Two figures come out:

- the overhead from step times: the median step with the callback against the median without,
  over all rounds pooled, and per round (noisy: a busy machine's jitter is larger than the
  effect);
- the overhead from the callback's own time: every callback method and the forward hook are
  timed from the inside, summed per step, and divided by the median step time without it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LMTOP_DIR", tempfile.mkdtemp(prefix="lmtop-bench-"))

import torch  # noqa: E402
import trainer_lora  # noqa: E402
import transformers  # noqa: E402
from _tiny import setup  # noqa: E402
from lmtop import hooks  # noqa: E402
from lmtop.hooks.trainer import LmtopCallback  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class StepTimer(TrainerCallback):
    """Stamps the end of each optimizer step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stamps.append(time.perf_counter())


class TimedLmtopCallback(LmtopCallback):
    """LmtopCallback, timing its own methods and forward hook from the inside."""

    spent = 0.0

    def __init__(self) -> None:
        super().__init__()
        for name in (
            "on_step_begin",
            "on_optimizer_step",
            "on_step_end",
            "on_log",
            "_on_forward",
        ):
            setattr(self, name, self._timed(getattr(self, name)))

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                TimedLmtopCallback.spent += time.perf_counter() - started

        return timed


def train(with_lmtop: bool, steps: int, seed: int) -> tuple[list[float], float]:
    """One training of the example; the step times and the callback's time per step."""
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    if with_lmtop:
        TimedLmtopCallback.spent = 0.0
        callbacks.insert(0, TimedLmtopCallback())
    trainer = trainer_lora.build_trainer(
        steps,
        seed=seed,
        output_dir=tempfile.mkdtemp(prefix="lmtop-bench-out-"),
        lmtop=False,
        callbacks=callbacks,
        eval_strategy="no",
        save_strategy="no",
    )
    trainer.train()
    if with_lmtop:
        hooks.finish()
    durations = [b - a for a, b in itertools.pairwise(timer.stamps)]
    return durations, TimedLmtopCallback.spent / len(timer.stamps) if with_lmtop else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    options = parser.parse_args()
    setup()
    load_before = os.getloadavg()[0]

    ratios: list[float] = []
    without_all: list[float] = []
    with_all: list[float] = []
    inside: list[float] = []
    for round_ in range(options.rounds):
        medians: dict[bool, float] = {}
        for with_lmtop in (round_ % 2 == 0, round_ % 2 == 1):
            times, spent = train(with_lmtop, options.steps, options.seed)
            times = times[options.skip :]
            medians[with_lmtop] = statistics.median(times)
            (with_all if with_lmtop else without_all).extend(times)
            if with_lmtop:
                inside.append(spent)
        ratios.append(medians[True] / medians[False] - 1)
        print(
            f"round {round_ + 1}: median step {medians[False] * 1e3:.2f} ms without, "
            f"{medians[True] * 1e3:.2f} ms with ({ratios[-1]:+.2%}); "
            f"callback's own time {inside[-1] * 1e6:.0f} µs/step",
            file=sys.stderr,
        )
    base = statistics.median(without_all)
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "rounds": options.rounds,
        "steps_per_training": options.steps,
        "median_step_ms_without": base * 1e3,
        "median_step_ms_with": statistics.median(with_all) * 1e3,
        "overhead_pooled": statistics.median(with_all) / base - 1,
        "overhead_from_step_times": statistics.median(ratios),
        "overhead_per_round": ratios,
        "callback_us_per_step": statistics.median(inside) * 1e6,
        "overhead_from_callback_time": statistics.median(inside) / base,
    }
    print(json.dumps(figures, indent=2))
    if options.json:
        Path(options.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
