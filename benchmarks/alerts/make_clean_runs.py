"""Clean training curves for the alert benchmark: real tiny trainings on CPU, saved through lmtop.

    .venv/bin/python benchmarks/alerts/make_clean_runs.py --out benchmarks/alerts/clean_runs

Two model families, several learning rates and seeds, each a real optimisation with the usual
recipe (AdamW, linear warm-up then cosine decay, gradient clipping, periodic evaluation):

- ``lm``: a 2-layer causal transformer language model (vocab 96, width 64) on token streams from a
  random sparse bigram source with Zipf-distributed transitions (an endless stream: no
  overfitting), the plain-loop metric names ``loss``, ``lr``, ``grad_norm``.
- ``mlp``: a 3-layer MLP classifier on a fresh Gaussian-mixture batch each step, with the
  Trainer's names ``loss``, ``learning_rate``, ``grad_norm``, ``epoch``.

Both log ``eval_loss`` every 100 steps, ``step_time``, ``tokens_per_second`` and a simulated
``memory_allocated`` with ``memory_total`` (CPU runs have no device memory). Every run is written
through ``lmtop.hooks`` as a run directory, exactly what a user's job would leave.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from lmtop import hooks
from torch import nn

VOCAB = 96
SEQ = 32
BATCH = 16
EVAL_EVERY = 100


class TinyLM(nn.Module):
    """A 2-layer causal transformer language model."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.zeros(SEQ, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.1, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(width, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.body(hidden, mask=self.mask, is_causal=True))


def bigram_source(seed: int) -> torch.Tensor:
    """A sparse bigram transition matrix with Zipf-like rows."""
    gen = torch.Generator().manual_seed(1000 + seed)
    probs = torch.zeros(VOCAB, VOCAB)
    ranks = torch.arange(1, 9, dtype=torch.float32)
    for row in range(VOCAB):
        targets = torch.randperm(VOCAB, generator=gen)[:8]
        probs[row, targets] = 1.0 / ranks**1.2
    return probs / probs.sum(1, keepdim=True)


def sample_tokens(probs: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    tokens = torch.empty(batch, SEQ + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
    for i in range(SEQ):
        tokens[:, i + 1] = torch.multinomial(probs[tokens[:, i]], 1, generator=gen).squeeze(1)
    return tokens


def schedule(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(kind: str, lr: float, seed: int, steps: int, out: Path) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    max_grad_norm = 1.0
    if kind == "lm":
        probs = bigram_source(seed % 2)
        model: nn.Module = TinyLM()
        eval_batches = [
            sample_tokens(probs, BATCH, torch.Generator().manual_seed(7)) for _ in range(8)
        ]
        names = {"lr": "lr"}
    else:
        centers = torch.randn(10, 32, generator=torch.Generator().manual_seed(seed % 2)) * 1.2
        model = nn.Sequential(
            nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)
        )
        eval_gen = torch.Generator().manual_seed(7)
        eval_labels = torch.randint(0, 10, (8, 64), generator=eval_gen)
        eval_batches = [
            torch.cat(
                [centers[y] + torch.randn(64, 32, generator=eval_gen) * 1.5, y[:, None].float()], 1
            )
            for y in eval_labels
        ]
        names = {"lr": "learning_rate"}
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    name = f"{kind}-lr{lr:g}-s{seed}"
    hooks.init(
        run=name,
        config={
            "model": kind,
            "learning_rate": lr,
            "seed": seed,
            "max_steps": steps,
            "max_grad_norm": max_grad_norm,
        },
        dir=out,
    )
    memory_total = 24e9
    for step in range(steps):
        began = time.perf_counter()
        model.train()
        if kind == "lm":
            tokens = sample_tokens(probs, BATCH, gen)
            logits = model(tokens[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
            n_tokens = BATCH * SEQ
        else:
            labels = torch.randint(0, 10, (64,), generator=gen)
            x = centers[labels] + torch.randn(64, 32, generator=gen) * 1.5
            loss = nn.functional.cross_entropy(model(x), labels)
            n_tokens = 64
        rate = schedule(step, steps, lr)
        for group in optimiser.param_groups:
            group["lr"] = rate
        optimiser.zero_grad()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        optimiser.step()
        elapsed = time.perf_counter() - began
        memory = (
            memory_total * (0.55 + 0.1 * min(1.0, step / 200))
            + float(torch.randn(1, generator=gen)) * 2e7
        )
        metrics = {
            "loss": loss.item(),
            names["lr"]: rate,
            "grad_norm": grad_norm,
            "step_time": elapsed,
            "tokens_per_second": n_tokens / elapsed,
            "memory_allocated": memory,
            "memory_total": memory_total,
        }
        if kind == "mlp":
            metrics["epoch"] = step / 500
        hooks.publish(metrics, step=step)
        if step % EVAL_EVERY == EVAL_EVERY - 1:
            model.eval()
            with torch.no_grad():
                if kind == "lm":
                    losses = [
                        float(
                            nn.functional.cross_entropy(
                                model(b[:, :-1]).reshape(-1, VOCAB), b[:, 1:].reshape(-1)
                            )
                        )
                        for b in eval_batches
                    ]
                else:
                    losses = [
                        float(nn.functional.cross_entropy(model(b[:, :-1]), b[:, -1].long()))
                        for b in eval_batches
                    ]
            hooks.publish({"eval_loss": sum(losses) / len(losses)}, step=step)
    hooks.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/alerts/clean_runs")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--kinds", default="lm,mlp")
    parser.add_argument("--lrs", default="")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th training from the i-th")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("LMTOP_RUNTIME_DIR", tempfile.mkdtemp(prefix="lt", dir="/tmp"))
    lrs = {"lm": [3e-4, 1e-3, 3e-3], "mlp": [1e-4, 1e-3, 1e-2]}
    jobs = [
        (kind, lr, seed)
        for kind in args.kinds.split(",")
        for lr in ([float(x) for x in args.lrs.split(",")] if args.lrs else lrs[kind])
        for seed in range(args.seeds)
    ]
    index, count = map(int, args.shard.split("/"))
    for kind, lr, seed in jobs[index::count]:
        began = time.time()
        train(kind, lr, seed, args.steps, Path(args.out))
        print(f"{kind} lr={lr:g} seed={seed}: {time.time() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
