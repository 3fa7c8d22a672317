"""Several runs on one chart: a sweep's curves side by side (``o`` in the viewer).

Each run's picture is computed as for a single run (min/max per column, never sampled); the
overlay draws its solid lines (the smoothed curve, or the ranks' median) in one colour per
run, the run shown (pinned) last so that it lies on top, over every run's raw envelope in grey
(a spike of any run stays in sight). With wall time on x, each run is shifted to its own
start, so runs started hours apart are compared from their first step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .charts import RANK_COLORS, Line, Picture

RUN_COLORS = RANK_COLORS
SUFFIXES = r"( (r\d+|\(smoothed\)|min|median|max))+$"  # a line's rank or part, not its kind
# Config keys a sweep varies, listed first when they differ (matched as words of the key).
SWEPT = re.compile(
    r"(^|[_.])(lr|learning_rate|r|rank|alpha|lora\w*|batch\w*|seed|warmup\w*|weight_decay|"
    r"optim\w*|scheduler|lr_scheduler\w*|model\w*|epochs?|num_train_epochs|max_steps|"
    r"gradient_accumulation_steps|dropout|beta\d?|eps|max_grad_norm|gradient_clipping)([_.]|$)"
)
# Keys that differ between any two runs without saying anything about them: listed last.
INCIDENTAL = re.compile(r"(dir|path|name|time|date|hub|token|report_to|logging|id)$")


def overlay(runs: list[tuple[str, Picture, float]], pinned: int) -> Picture:
    """One picture of ``runs`` ((name, picture, x shift) each); ``pinned`` indexes the one on top."""
    if not runs:
        return Picture(title="")
    title = runs[pinned][1].title
    out = Picture(title=title, x_low=math.inf, x_high=-math.inf)
    order = [i for i in range(len(runs)) if i != pinned] + [pinned]
    # The raw envelopes (grey, as on a single run's chart) under every curve: a spike of any
    # run stays in sight.
    for name, pic, shift in runs:
        for line in pic.lines:
            if line.faint:
                out.lines.append(
                    Line(
                        f"{name} raw",
                        [x - shift for x in line.x],
                        list(line.y),
                        line.color,
                        True,
                        "dot",
                    )
                )
    for index in order:
        name, pic, shift = runs[index]
        if pic.empty:
            continue
        color = RUN_COLORS[index % len(RUN_COLORS)]
        solid = [line for line in pic.lines if not line.faint]
        kinds = _kinds(solid)
        for line in solid:
            kind = kinds[line.label]
            label = name if not kind else f"{name} {kind}"
            # A second kind of line (eval) of a run: its colour, drawn with dots.
            marker = "braille" if not kind else "dot"
            out.lines.append(
                Line(label, [x - shift for x in line.x], list(line.y), color, marker=marker)
            )
        out.marks += [(x - shift, why) for x, why in pic.marks if why != "alert"]
        out.y_low, out.y_high = min(out.y_low, pic.y_low), max(out.y_high, pic.y_high)
        out.x_low = min(out.x_low, pic.x_low - shift)
        out.x_high = max(out.x_high, pic.x_high - shift)
    if out.x_low > out.x_high:
        out.x_low, out.x_high = 0.0, 1.0
    out.x_origin = 0.0 if any(shift for _, _, shift in runs) else out.x_low
    out.note = f"{len(runs)} runs"
    return out


def _kinds(lines: list[Line]) -> dict[str, str]:
    """Each line's kind within its run: "" for the first (train), then its own label (eval)."""
    bare = {line.label: re.sub(SUFFIXES, "", line.label) for line in lines}
    first = next(iter(bare.values()), "")
    return {label: ("" if kind == first else kind) for label, kind in bare.items()}


def config_diff(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The config keys whose values differ between ``configs`` (a key one of them lacks
    differs): what a sweep varied first (learning rate, LoRA r, batch size, ...), then the rest,
    then what differs between any two runs (output folders, names, times). Nested settings are
    ``outer.inner``."""
    flat = [flatten(config) for config in configs]
    keys = sorted({key for config in flat for key in config})
    missing = object()
    differ = [key for key in keys if len({repr(config.get(key, missing)) for config in flat}) > 1]

    def order(key: str) -> int:
        last = key.rsplit(".", 1)[-1]
        return 2 if INCIDENTAL.search(last) else 0 if SWEPT.search(key) else 1

    return sorted(differ, key=order)


def flatten(config: Mapping[str, Any], prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` as ``{"lora.r": 8}``, ``depth`` levels down."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and depth > 1:
            out.update(flatten(value, f"{name}.", depth - 1))
        else:
            out[name] = value
    return out
