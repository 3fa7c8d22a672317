"""What the examples share: a tiny Llama built from a config, a tokenizer built in memory, and
synthetic arithmetic questions with their answers. Nothing is downloaded; all of it fits on a CPU.

The task: ``Q: 17+25=? A: 42``. Only the answer's tokens are labelled, as in supervised
fine-tuning, so the loss is the model's surprise at the answer.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[NAN]"]  # [NAN]: a token the NaN test poisons
CHARS = list("0123456789+-*=? QA:")
VOCAB_SIZE = 32  # the model's; the tokenizer uses the first len(SPECIAL) + len(CHARS)
IGNORE = -100  # labels the loss skips


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer, made in memory with ``tokenizers``."""
    vocab = {token: i for i, token in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


def build_model(seed: int = 0, layers: int = 2, hidden: int = 64) -> LlamaForCausalLM:
    """A Llama with two layers of width 64, initialised from ``seed``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def arithmetic(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` questions and their answers: sums, differences and products of small numbers."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        op = rng.choice("+-*")
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        pairs.append((f"Q: {a}{op}{b}=? A: ", str(answer)))
    return pairs


class ArithmeticDataset(torch.utils.data.Dataset[dict[str, list[int]]]):
    """Tokenised question/answer pairs; the question's tokens are not labelled."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, count: int, seed: int) -> None:
        self.items: list[dict[str, list[int]]] = []
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        for question, answer in arithmetic(count, seed):
            prompt = [bos, *tokenizer.encode(question, add_special_tokens=False)]
            reply = [*tokenizer.encode(answer, add_special_tokens=False), eos]
            self.items.append(
                {"input_ids": prompt + reply, "labels": [IGNORE] * len(prompt) + reply}
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pads a batch on the right: input_ids, attention_mask and labels."""
    width = max(len(item["input_ids"]) for item in batch)
    ids, mask, labels = [], [], []
    for item in batch:
        gap = width - len(item["input_ids"])
        ids.append(item["input_ids"] + [pad_id] * gap)
        mask.append([1] * len(item["input_ids"]) + [0] * gap)
        labels.append(item["labels"] + [IGNORE] * gap)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up from 0, then cosine decay to 0.

    The same shape as ``transformers.get_cosine_schedule_with_warmup``.
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def setup() -> None:
    """One thread (a model this small only loses time to threads, the more on a busy machine),
    and the examples' output kept to their own lines."""
    import warnings

    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def end_distributed() -> None:
    """Ends a CPU (gloo) rank here, once every rank is done, without freeing the DDP model.

    On CPU ranks a rank can hang at exit (pytorch/pytorch#56297): freeing the DDP model frees
    gloo's process group, whose destructor waits for a worker thread while holding the GIL,
    and the worker, destroying a finished all-reduce whose tensors are Python objects, waits for
    the GIL. py-spy shows exactly that on hung ranks of ``accelerate_loop.py``, whose
    ``accelerator.end_training()`` had already destroyed the process group: the DDP model
    still holds it. So a CPU rank of a multi-process run, its work done, records its end with
    lmtop, flushes its output and leaves with ``os._exit(0)``: nothing is left to free. NCCL
    (GPU) ranks return normally after ``destroy_process_group``, as PyTorch asks.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.barrier()
        dist.destroy_process_group()
    else:  # already destroyed (accelerate's end_training does it): the DDP model still holds it
        gloo = not torch.cuda.is_available()
    if gloo and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from lmtop import hooks

        hooks.finish()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def describe(config: dict[str, Any]) -> str:
    """One line of the settings that matter, for the example's first print."""
    return " ".join(f"{k}={v}" for k, v in config.items())
