"""The metric and config vocabulary: which names mean loss, grad norm, learning rate, ...

One place for every spelling, read by the charts, the ranks table, the header and the alerts
alike, so that a name one of them knows the others know too. Names are matched after
lower-casing and turning ``/ . -`` and spaces into ``_``:

- training loss: ``loss``, ``train_loss``, ``training_loss``, ``train/loss``;
- eval loss: ``eval_loss``, ``eval/loss``, ``val_loss``, ``validation_loss``, ``valid_loss``;
- grad norm: ``grad_norm``, ``gradient_norm``, ``train/grad_norm``, ``total_grad_norm``;
- learning rate: ``lr``, ``learning_rate``, ``train/learning_rate``, ``lr_<group>``;
- memory: a name with ``mem`` and one of ``alloc``, ``reserved``, ``used`` (against a metric with
  ``mem`` and ``total``, or the config's ``memory_total``), or with ``mem`` and ``percent``/``pct``.

Config keys are matched as written: ``max_grad_norm`` (Trainer), ``gradient_clipping``
(accelerate/DeepSpeed), ``grad_clip``, ``clip_grad_norm``, ``max_norm``, ``gradient_clip_val``
(Lightning) all name the clipping threshold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

LOSS, EVAL_LOSS, GRAD_NORM, LR, MEM_USED, MEM_TOTAL, MEM_PERCENT, OTHER = range(8)

# The names each chart draws, in order of preference (the first one a run publishes wins).
LOSS_NAMES = ("loss", "train/loss", "train_loss", "training_loss")
EVAL_LOSS_NAMES = ("eval_loss", "eval/loss", "val_loss", "validation_loss", "valid_loss")
GRAD_NORM_NAMES = ("grad_norm", "train/grad_norm", "grad-norm", "gradient_norm", "total_grad_norm")
LR_NAMES = ("learning_rate", "lr", "train/learning_rate")
THROUGHPUT_NAMES = (
    "tokens_per_second",
    "tokens_per_sec",
    "train/tokens_per_second",
    "samples_per_second",
    "samples_per_sec",
)
STEP_TIME_NAMES = ("step_time", "step_time_s", "train/step_time")
MEMORY_GB_NAMES = (
    "memory_gb",
    "gpu_memory_allocated_gb",
    "memory_allocated_gb",
    "gpu_mem_gb",
    "host_rss_gb",
    "rss_gb",
)
EPOCH_NAMES = ("epoch", "train/epoch")

# Config keys, as the frameworks spell them.
MAX_GRAD_NORM_KEYS = (
    "max_grad_norm",
    "gradient_clipping",
    "grad_clip",
    "clip_grad_norm",
    "max_norm",
    "gradient_clip_val",
)
MEMORY_TOTAL_KEYS = ("memory_total", "gpu_memory_total", "device_memory_total")
WARMUP_KEYS = ("warmup_steps", "num_warmup_steps", "lr_warmup_steps")
WARMUP_RATIO_KEYS = ("warmup_ratio",)
TOTAL_STEPS_KEYS = ("total_steps", "max_steps", "num_training_steps", "steps")

_SEPARATORS = re.compile(r"[/.\- ]+")
_LR_GROUP = re.compile(r"lr_(group_?)?\d+|learning_rate_\d+")


def normalise(name: str) -> str:
    """``"train/Loss"`` -> ``"train_loss"``: the form metric names are matched in."""
    return _SEPARATORS.sub("_", name.strip().lower())


def classify(name: str) -> int:
    """Which known metric a name is (one of LOSS, EVAL_LOSS, ..., OTHER)."""
    key = normalise(name)
    for prefix in ("train_", "training_"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    if key == "loss":
        return LOSS
    if key in ("eval_loss", "val_loss", "validation_loss", "valid_loss", "eval_val_loss"):
        return EVAL_LOSS
    if key in ("grad_norm", "gradient_norm", "total_grad_norm", "grad_norm_total"):
        return GRAD_NORM
    if key in ("lr", "learning_rate") or _LR_GROUP.fullmatch(key):
        return LR
    if "mem" in key:
        if "total" in key:
            return MEM_TOTAL
        if "percent" in key or "pct" in key:
            return MEM_PERCENT
        if any(word in key for word in ("alloc", "reserved", "used")):
            return MEM_USED
    return OTHER


def first_present(candidates: tuple[str, ...], names: set[str] | frozenset[str]) -> str | None:
    """The first of ``candidates`` that a run publishes."""
    return next((n for n in candidates if n in names), None)


def config_number(config: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    """The first finite number the config holds under one of ``keys``."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def max_grad_norm(config: Mapping[str, Any]) -> float | None:
    """The clipping threshold the run's config names, if any (a positive number)."""
    value = config_number(config, MAX_GRAD_NORM_KEYS)
    return value if value is not None and value > 0 else None


def total_steps(config: Mapping[str, Any]) -> int | None:
    """The run's planned number of optimizer steps, when its config says."""
    for key in TOTAL_STEPS_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def warmup_steps(config: Mapping[str, Any]) -> int:
    """The run's warm-up in steps: ``warmup_steps``, or ``warmup_ratio`` × ``max_steps``."""
    warmup = config_number(config, WARMUP_KEYS)
    if warmup is None:
        ratio, steps = config_number(config, WARMUP_RATIO_KEYS), total_steps(config)
        if ratio is not None and steps is not None:
            warmup = ratio * steps
    return int(warmup or 0)
