"""Clean traces of real fine-tunes for the spike benchmark: tiny Llamas and an MLP, trained on CPU.

    nice -n 10 .venv/bin/python benchmarks/alerts/make_real_runs.py --shard 0/2 &   # two processes:
    nice -n 10 .venv/bin/python benchmarks/alerts/make_real_runs.py --shard 1/2 &   # 38 min on 2 cores
    .venv/bin/python benchmarks/alerts/make_real_runs.py --pack     # -> real_runs.tar.xz

Each training is a real optimisation (linear warm-up then cosine decay, periodic evaluation) and
records, per optimizer step, the training loss (mean over the accumulated micro-batches), the
grad norm *before* clipping (what ``clip_grad_norm_`` returns and Trainer reports), the learning
rate and, every 100 steps, the eval loss. The recipes span what the spike alerts must hold on,
each with two seeds (54 runs × 3000 steps, 7-220 s a run):

- ``llama``: a 2-layer Llama (hidden 64, 4 heads, MLP 128, vocab 96, sequence 32) built from a
  config, first pre-trained for 300 steps on one random sparse bigram source, then fine-tuned on
  another one (fully, or with LoRA r=8 on the attention projections through peft); batch size 1,
  4 or 16, AdamW or ``transformers.optimization.Adafactor``, learning rates from 1e-4 to 3e-2,
  with and without clipping at 1.0, with and without gradient accumulation;
- ``mlp``: the near-zero-loss family of ``make_clean_runs.py`` (a 3-layer MLP on a separable
  Gaussian mixture, AdamW, clipping), whose loss ends at 0.008-0.07, where single batches swing
  to 10× the median.

Nothing is downloaded (``HF_HUB_OFFLINE=1`` is set). A run is written, when it ends, as one text
file ``<recipe>-lr<lr>-s<seed>.tsv`` under ``--out`` (a ``#`` line of JSON with the recipe, then
``step loss grad_norm lr eval_loss`` with 7 significant digits, eval_loss ``nan`` between
evaluations); ``--pack`` puts them in ``real_runs.tar.xz`` beside this script (read by
``spikes.py``). The training is single-threaded: ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from make_clean_runs import SEQ, VOCAB, bigram_source, sample_tokens, schedule  # same folder
from torch import nn

HERE = Path(__file__).parent
EVAL_EVERY = 100
PRETRAIN_STEPS = 300


@dataclass(frozen=True)
class Recipe:
    """One training: model, tuning, optimizer, batch, accumulation, clipping, learning rate."""

    family: str  # the runs whose tails are reported together (all but the learning rate)
    model: str  # "llama" or "mlp"
    tuning: str  # "full" or "lora"
    optimizer: str  # "adamw" or "adafactor"
    batch: int  # micro-batch size
    accumulation: int  # micro-batches per optimizer step
    clip: float | None  # max_grad_norm, None for no clipping
    lr: float
    seed: int = 0  # the data order (and LoRA's initialisation); the base model is shared

    @property
    def name(self) -> str:
        return f"{self.family}-lr{self.lr:g}-s{self.seed}"


def _family(model: str, tuning: str, opt: str, batch: int, acc: int, clip: float | None) -> str:
    accumulate = f"x{acc}" if acc > 1 else ""
    return f"{model}-{tuning}-{opt}-b{batch}{accumulate}-{'clip' if clip else 'noclip'}"


def recipes(seeds: int = 2) -> list[Recipe]:
    """The grid: 8 Llama families × 3 learning rates, and the MLP family × 3, for each seed."""
    grid = [
        # model, tuning, optimizer, batch, accumulation, clip, learning rates
        ("llama", "full", "adamw", 16, 1, 1.0, (1e-4, 1e-3, 1e-2)),
        ("llama", "full", "adamw", 4, 1, None, (1e-4, 1e-3, 3e-3)),
        ("llama", "full", "adamw", 1, 1, 1.0, (1e-4, 3e-4, 1e-3)),
        ("llama", "full", "adamw", 4, 4, 1.0, (1e-4, 1e-3, 1e-2)),
        ("llama", "lora", "adamw", 16, 1, 1.0, (3e-4, 3e-3, 3e-2)),
        ("llama", "lora", "adamw", 1, 4, None, (3e-4, 3e-3, 3e-2)),
        ("llama", "full", "adafactor", 16, 1, None, (1e-4, 1e-3, 1e-2)),
        ("llama", "full", "adafactor", 1, 1, 1.0, (1e-4, 1e-3, 1e-2)),
        ("mlp", "full", "adamw", 64, 1, 1.0, (1e-4, 1e-3, 1e-2)),
    ]
    return [
        Recipe(_family(m, t, o, b, a, c), m, t, o, b, a, c, lr, seed)
        for seed in range(seeds)  # seed-major: a partial set still spans every family
        for m, t, o, b, a, c, lrs in grid
        for lr in lrs
    ]


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def pretrained_base() -> dict[str, torch.Tensor]:
    """The base model every Llama run fine-tunes: 300 AdamW steps on bigram source 0."""
    torch.manual_seed(0)
    model = llama()
    gen = torch.Generator().manual_seed(0)
    probs = bigram_source(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(PRETRAIN_STEPS):
        optimiser.zero_grad()
        lm_loss(model, sample_tokens(probs, 16, gen)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
    return model.state_dict()


def train(recipe: Recipe, steps: int, base: dict[str, torch.Tensor] | None) -> list[tuple]:
    """One training; its rows (step, loss, grad_norm, lr, eval_loss)."""
    torch.manual_seed(1 + recipe.seed)
    gen = torch.Generator().manual_seed(1 + recipe.seed)
    if recipe.model == "llama":
        model = llama()
        assert base is not None
        model.load_state_dict(base)
        probs = bigram_source(1)  # the fine-tuning data: a different source than the base's
        eval_gen = torch.Generator().manual_seed(7)
        eval_batches = [sample_tokens(probs, 16, eval_gen) for _ in range(4)]
        if recipe.tuning == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
                ),
            )

        def batch_loss() -> torch.Tensor:
            return lm_loss(model, sample_tokens(probs, recipe.batch, gen))

        def eval_loss() -> float:
            return sum(float(lm_loss(model, b)) for b in eval_batches) / len(eval_batches)

    else:
        centers = torch.randn(10, 32, generator=torch.Generator().manual_seed(0)) * 1.2
        model = nn.Sequential(
            nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)
        )
        eval_gen = torch.Generator().manual_seed(7)
        eval_labels = torch.randint(0, 10, (4, 64), generator=eval_gen)
        eval_x = [centers[y] + torch.randn(64, 32, generator=eval_gen) * 1.5 for y in eval_labels]

        def batch_loss() -> torch.Tensor:
            labels = torch.randint(0, 10, (recipe.batch,), generator=gen)
            x = centers[labels] + torch.randn(recipe.batch, 32, generator=gen) * 1.5
            return nn.functional.cross_entropy(model(x), labels)

        def eval_loss() -> float:
            losses = [
                float(nn.functional.cross_entropy(model(x), y)) for x, y in zip(eval_x, eval_labels)
            ]
            return sum(losses) / len(losses)

    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        optimiser: torch.optim.Optimizer = Adafactor(
            params, lr=recipe.lr, scale_parameter=False, relative_step=False, warmup_init=False
        )
    else:
        optimiser = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    rows = []
    for step in range(steps):
        model.train()
        rate = schedule(step, steps, recipe.lr)
        for group in optimiser.param_groups:
            group["lr"] = rate
        optimiser.zero_grad()
        total = 0.0
        for _ in range(recipe.accumulation):
            loss = batch_loss() / recipe.accumulation
            loss.backward()
            total += float(loss.detach())
        # The pre-clip norm: clip_grad_norm_ returns it; with no clipping, max_norm=inf.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, recipe.clip or math.inf))
        optimiser.step()
        evaluated = math.nan
        if step % EVAL_EVERY == EVAL_EVERY - 1:
            model.eval()
            with torch.no_grad():
                evaluated = eval_loss()
        rows.append((step, total, grad_norm, rate, evaluated))
    return rows


def write(recipe: Recipe, rows: list[tuple], seconds: float, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {**asdict(recipe), "steps": len(rows), "seconds": round(seconds)}
    lines = [f"# {json.dumps(meta)}", "step\tloss\tgrad_norm\tlr\teval_loss"]
    lines += [f"{s}\t{a:.7g}\t{b:.7g}\t{c:.7g}\t{d:.7g}" for s, a, b, c, d in rows]
    path = out / f"{recipe.name}.tsv"
    path.with_suffix(".part").write_text("\n".join(lines) + "\n")
    path.with_suffix(".part").rename(path)  # a file under --out is always a finished run


def pack(out: Path) -> Path:
    archive = HERE / "real_runs.tar.xz"
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        for path in sorted(out.glob("*.tsv")):
            tar.add(path, arcname=f"real_runs/{path.name}")
    return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "real_runs"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th training from the i-th")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", default="", help="recipes whose name contains this")
    parser.add_argument("--pack", action="store_true", help="archive the finished runs and exit")
    args = parser.parse_args()
    out = Path(args.out)
    if args.pack:
        print(pack(out))
        return
    torch.set_num_threads(1)
    index, count = map(int, args.shard.split("/"))
    todo = [r for r in recipes(args.seeds) if args.only in r.name][index::count]
    todo = [r for r in todo if not (out / f"{r.name}.tsv").exists()]  # resumable
    base = pretrained_base() if any(r.model == "llama" for r in todo) else None
    for recipe in todo:
        began = time.time()
        rows = train(recipe, args.steps, base)
        write(recipe, rows, time.time() - began, out)
        print(f"{recipe.name}: {time.time() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
