"""Fine-tune a tiny Llama with LoRA through ``transformers.Trainer``, watched by lmtop.

    python examples/trainer_lora.py                  # one process, CPU, about 10 seconds
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        examples/trainer_lora.py                     # two ranks, one run
    lmtop                                            # in another terminal, meanwhile or after

The model is built from a config, the tokenizer in memory, the data is synthetic arithmetic
(``Q: 17+25=? A: 42``): nothing is downloaded. The one line that matters is
``callbacks=[LmtopCallback()]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

from _tiny import ArithmeticDataset, build_model, build_tokenizer, collate, end_distributed, setup
from lmtop.hooks import LmtopCallback
from peft import LoraConfig, get_peft_model
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments


def build_trainer(
    max_steps: int = 120,
    seed: int = 0,
    output_dir: str | None = None,
    lmtop: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
    **overrides: object,
) -> Trainer:
    """The example's Trainer: LoRA r=8 on every linear layer, warm-up then cosine decay.

    The embeddings and the head are trained in full (``modules_to_save``): the model starts from
    random weights, so no low-rank update of them could learn the vocabulary's meaning.
    """
    tokenizer = build_tokenizer()
    model = get_peft_model(
        build_model(seed=seed),
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules="all-linear",
            modules_to_save=["embed_tokens", "lm_head"],
            task_type="CAUSAL_LM",
        ),
    )
    settings: dict[str, object] = {
        # The same on every rank: a folder in the temporary directory unless told otherwise.
        "output_dir": output_dir or os.path.join(tempfile.gettempdir(), "lmtop-trainer_lora"),
        "max_steps": max_steps,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, max_steps // 10),
        "max_grad_norm": 1.0,
        "weight_decay": 0.01,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": max(1, max_steps // 3),
        "save_strategy": "steps",
        "save_steps": max(1, max_steps // 2),
        "save_total_limit": 1,
        "report_to": "none",
        "use_cpu": True,
        "seed": seed,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**settings),  # type: ignore[arg-type]
        train_dataset=ArithmeticDataset(tokenizer, 4000, seed=seed + 1),
        eval_dataset=ArithmeticDataset(tokenizer, 64, seed=seed + 2),
        data_collator=collate,
        processing_class=tokenizer,
        callbacks=[*([LmtopCallback()] if lmtop else []), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # a line per step: lmtop shows them better
    return trainer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir", default=None, help="checkpoints (default: $TMPDIR/lmtop-trainer_lora)"
    )
    parser.add_argument("--no-lmtop", action="store_true", help="train without the callback")
    options = parser.parse_args(argv)
    setup()
    trainer = build_trainer(
        options.max_steps, options.seed, options.output_dir, lmtop=not options.no_lmtop
    )
    result = trainer.train()
    if trainer.is_world_process_zero():
        evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
        print(
            f"trained {result.global_step} steps: train loss {result.training_loss:.3f}, "
            f"last eval loss {evals[-1] if evals else float('nan'):.3f}",
            file=sys.stderr,
        )
    end_distributed()


if __name__ == "__main__":
    main()
