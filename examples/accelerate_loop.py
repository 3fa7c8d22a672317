"""An ``accelerate`` training loop on several processes, every rank watched by lmtop.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        examples/accelerate_loop.py          # two CPU ranks (on GPUs: leave out the variable)
    python examples/accelerate_loop.py      # or one process
    lmtop                                   # in another terminal, meanwhile or after

``Accelerator(log_with=LmtopTracker())`` makes lmtop one of the accelerator's trackers. Because
``Accelerator.log`` runs on the main process only, the loop logs through ``log_every_rank``:
the main process logs to every tracker as before, and each other rank publishes its own figures.
Gradient accumulation, clipping, linear warm-up then cosine decay, an evaluation every
``--eval-every`` steps.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from _tiny import (
    ArithmeticDataset,
    build_model,
    build_tokenizer,
    collate,
    end_distributed,
    setup,
    warmup_cosine,
)
from accelerate import Accelerator
from accelerate.utils import set_seed
from lmtop.hooks import event
from lmtop.hooks.accelerate import LmtopTracker, init_every_rank, log_every_rank
from lmtop.hooks.tensors import device_memory, learning_rates
from torch.utils.data import DataLoader


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="per process and micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    setup()

    accelerator = Accelerator(
        log_with=LmtopTracker(), gradient_accumulation_steps=options.accumulate
    )
    set_seed(options.seed)
    tokenizer = build_tokenizer()
    model = build_model(seed=options.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.01)
    # Not prepared: accelerate would step a prepared scheduler once per process. Stepped here
    # once per optimizer step, the schedule is the same on any number of processes.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, options.warmup, options.steps)
    )
    train = DataLoader(
        ArithmeticDataset(tokenizer, 4000, seed=options.seed + 1),
        batch_size=options.batch_size,
        shuffle=True,
        collate_fn=collate,
    )
    held_out = DataLoader(
        ArithmeticDataset(tokenizer, 128, seed=options.seed + 2), batch_size=32, collate_fn=collate
    )
    model, optimizer, train, held_out = accelerator.prepare(model, optimizer, train, held_out)
    init_every_rank(
        accelerator,
        "accelerate_loop",
        config={
            **vars(options),
            "framework": "accelerate",
            "lr_scheduler_type": "cosine",
            "world_size": accelerator.num_processes,
            "effective_batch_size": options.batch_size
            * options.accumulate
            * accelerator.num_processes,
            "total_steps": options.steps,
        },
    )

    step, micro, loss_sum = 0, 0, torch.zeros((), device=accelerator.device)
    started = time.perf_counter()
    model.train()
    while step < options.steps:
        for batch in train:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                loss_sum += loss.detach()
                micro += 1
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), options.max_grad_norm
                    )
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            rates = learning_rates(optimizer)  # the rate this step used
            schedule.step()
            seconds = time.perf_counter() - started
            figures = {
                "loss": loss_sum / micro,  # this rank's, a tensor: no .item() in the loop
                "grad_norm": grad_norm,
                **rates,
                "micro_batches": micro,
                "step_time": seconds,
                "samples_per_second": micro * options.batch_size / seconds,
                **device_memory(),
            }
            log_every_rank(accelerator, figures, step=step)
            step_loss = loss_sum / micro
            loss_sum, micro = torch.zeros((), device=accelerator.device), 0
            if step % options.eval_every == 0 or step == options.steps:
                eval_loss = evaluate(model, held_out, accelerator)
                log_every_rank(accelerator, {"eval_loss": eval_loss}, step=step)
                event(f"evaluation: eval_loss {eval_loss:.4g}", step=step)
                if accelerator.is_main_process:
                    print(f"step {step}: loss {step_loss.item():.3f} eval loss {eval_loss:.3f}")
            started = time.perf_counter()
            if step == options.steps:
                break
    accelerator.end_training()
    end_distributed()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader[Any], accelerator: Accelerator) -> float:
    """The mean loss over the whole evaluation set, the same on every rank."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for batch in loader:
        size = batch["input_ids"].shape[0]
        loss = model(**batch).loss
        total += torch.stack([loss * size, loss.new_tensor(float(size))])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


if __name__ == "__main__":
    main()
