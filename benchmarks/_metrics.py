"""The 8 scalars a fine-tuning loop reports each step: what every benchmark here logs."""

NAMES = (
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "step_time",
    "memory_gb",
    "epoch",
    "perplexity",
)
