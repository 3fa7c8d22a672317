"""``lmtop demo``: simulated ranks publish through the real hook; the real viewer shows them.

Each rank is a real process that calls ``lmtop.hooks.publish``: warm-up then cosine learning rate,
a noisy falling loss, an eval loss every few steps that turns upward late (overfitting), one
grad-norm spike, one loss spike, a straggling last rank, throughput and memory. No GPU, no torch.
Quitting the viewer stops and reaps every rank.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from . import collector


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmtop demo", description="Simulated training ranks, shown live."
    )
    parser.add_argument(
        "--ranks", type=int, default=4, help="simulated ranks (processes), default 4"
    )
    parser.add_argument(
        "--steps", type=int, default=3000, help="optimizer steps per rank, default 3000"
    )
    parser.add_argument("--speed", type=float, default=1.0, help="1 = about 40 steps a second")
    parser.add_argument(
        "--dir", default=None, help="folder of runs (default: a new temporary folder)"
    )
    parser.add_argument(
        "--headless", action="store_true", help="print JSON lines instead of the screen"
    )
    return parser


def schedule(step: int, steps: int, peak: float = 3e-4, floor: float = 3e-5) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to ``floor``."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def simulate(rank: int, world: int, steps: int, speed: float) -> None:
    """One rank's training loop, publishing every step."""
    from lmtop import hooks

    rng = random.Random(1234 + rank)
    eval_every = max(10, steps // 25)
    tokens = 8 * 2048
    straggler = world > 1 and rank == world - 1
    base = 0.025 / max(speed, 1e-3)
    hooks.init(
        config={
            "model": "LlamaForCausalLM (simulated)",
            "learning_rate": 3e-4,
            "lr_scheduler_type": "cosine",
            "warmup_steps": max(1, steps // 20),
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "max_grad_norm": 1.0,
            "total_steps": steps,
            "world_size": world,
        }
    )
    for step in range(steps):
        progress = step / steps
        loss = 0.35 + 2.4 * math.exp(-4 * progress) + rng.gauss(0, 0.03)
        if step == int(0.55 * steps) and rank == 0:
            # One loss spike, big enough to be a warning (a 4x blip the run absorbs is info).
            loss *= 20
        # Multiplicative noise, as real grad norms have (a half-normal added on top made the
        # spike detector fire ~26 times in a 4 x 3000-step demo; this makes it ~2).
        grad_norm = (0.45 * math.exp(-2 * progress) + 0.35) * math.exp(rng.gauss(0, 0.06))
        if step == int(0.35 * steps):
            grad_norm *= 15  # one grad-norm spike, on every rank
        step_time = base * (2.0 if straggler else 1.0) * (1 + abs(rng.gauss(0, 0.08)))
        metrics = {
            "loss": loss,
            "learning_rate": schedule(step, steps),
            "grad_norm": grad_norm,
            "epoch": 3 * progress,
            "step_time": step_time,
            "tokens_per_second": tokens / step_time,
            "memory_gb": 31.5 + 0.4 * rank + 0.3 * math.sin(step / 50) + rng.gauss(0, 0.05),
        }
        hooks.publish(metrics, step=step)
        if step % eval_every == eval_every - 1 and rank == 0:
            late = max(0.0, progress - 0.6)
            eval_loss = 0.42 + 2.4 * math.exp(-4 * progress) + 3.0 * late**2 + rng.gauss(0, 0.01)
            hooks.publish(
                {"eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss)}, step=step
            )
            hooks.event(f"evaluation at step {step}: eval_loss {eval_loss:.3f}", step=step)
        if step % 1000 == 999:
            hooks.event(f"checkpoint saved: checkpoint-{step + 1}", step=step)
        time.sleep(step_time)
    hooks.finish()


def start_ranks(ranks: int, steps: int, speed: float, folder: str) -> list[subprocess.Popen[bytes]]:
    """Starts the simulated ranks as children of this process, as torchrun would."""
    procs = []
    for rank in range(ranks):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(ranks),
            LMTOP_DIR=folder,
        )
        env.pop("LMTOP_RUN", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "lmtop.tui.demo", "--rank-process", str(steps), str(speed)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stops every rank and reaps it."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 3
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str]) -> int:
    """``lmtop demo``: start the ranks, open the viewer on their run, stop them on quit."""
    args = list(argv)
    if args[:1] == ["--rank-process"]:
        simulate(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(args[1]), float(args[2])
        )
        return 0
    options = _parser().parse_args(args)
    folder = options.dir or tempfile.mkdtemp(prefix="lmtop-demo-")
    procs = start_ranks(max(1, options.ranks), max(10, options.steps), options.speed, folder)
    try:
        if options.headless:
            from . import headless

            collector.settle()  # as lmtop's viewer does (the ranks are other processes)
            return headless.run([folder])
        from .app import run_app

        collector.settle()
        return run_app([folder])
    finally:
        stop(procs)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main(sys.argv[1:]))
