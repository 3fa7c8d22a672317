"""A plain PyTorch training loop, watched by lmtop: two lines, ``init`` and ``publish``.

    python examples/plain_loop.py        # CPU (or the GPU, if there is one): about 10 seconds
    lmtop                                # in another terminal, meanwhile or after

Linear warm-up then cosine decay, gradient clipping, an evaluation every ``--eval-every`` steps.
The loss and the gradient norm are published as tensors: on a GPU they reach lmtop without the
host waiting for the device (no ``.item()`` in the loop).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from _tiny import ArithmeticDataset, build_model, build_tokenizer, collate, setup, warmup_cosine
from lmtop import hooks
from lmtop.hooks.tensors import device_memory, learning_rates
from torch.utils.data import DataLoader


def batches(loader: DataLoader[Any]) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader[Any], device: str) -> float:
    """The mean loss over the evaluation set."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        total += model(**batch).loss.item() * len(batch["input_ids"])
        count += len(batch["input_ids"])
    model.train()
    return total / count


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args(argv)
    setup()

    tokenizer = build_tokenizer()
    model = build_model(seed=options.seed).to(options.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, options.warmup, options.steps)
    )
    generator = torch.Generator().manual_seed(options.seed)
    train = DataLoader(
        ArithmeticDataset(tokenizer, 4000, seed=options.seed + 1),
        batch_size=options.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=generator,
    )
    held_out = DataLoader(
        ArithmeticDataset(tokenizer, 128, seed=options.seed + 2), batch_size=64, collate_fn=collate
    )

    hooks.init(
        config={
            **vars(options),
            "lr_scheduler_type": "cosine",
            "total_steps": options.steps,
            "model_class": type(model).__name__,
            "total_params": sum(p.numel() for p in model.parameters()),
        }
    )
    model.train()
    data = batches(train)
    for step in range(1, options.steps + 1):
        started = time.perf_counter()
        batch = {k: v.to(options.device, non_blocking=True) for k, v in next(data).items()}
        loss = model(**batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.max_grad_norm)
        rates = learning_rates(optimizer)  # the rate this step uses, before the schedule moves
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        loss = loss.detach()
        hooks.publish(
            {
                "loss": loss,
                "perplexity": loss.exp(),
                "grad_norm": grad_norm,
                **rates,
                "step_time": seconds,
                "tokens_per_second": batch["attention_mask"].sum() / seconds,
                "samples_per_second": len(batch["input_ids"]) / seconds,
                **device_memory(),
            },
            step=step,
        )
        if step % options.eval_every == 0 or step == options.steps:
            eval_loss = evaluate(model, held_out, options.device)
            hooks.publish(
                {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700))},
                step=step,
            )
            hooks.event(f"evaluation: eval_loss {eval_loss:.4g}", step=step)
            print(f"step {step}: eval loss {eval_loss:.3f}")
    hooks.finish()


if __name__ == "__main__":
    main()
