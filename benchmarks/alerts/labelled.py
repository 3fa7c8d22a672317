"""The labelled set: clean run directories plus injected events of known type, step and size.

Every case is a list of protocol messages (``schema.Message``) with the events it holds. A clean
trace is a rank file written by ``make_clean_runs.py``; injections change copies of its values:

- spike (loss, grad_norm): the value at step s becomes median + k × MAD of the 50 clean values
  before it, k in 3..50 (``additive`` variant: the clean value + k × MAD);
- nonfinite: NaN, +Inf or -Inf in loss, grad_norm, the learning rate or eval_loss at step s (NaN
  cases keep the loss NaN from there on, as a real blow-up does);
- divergence: from step s the loss climbs back towards its initial level, e-folding in τ steps;
- overfitting: from step s the eval loss rises by r per evaluation;
- clipping: from step s the grad norm sits at 1.3-3 × max_grad_norm;
- learning_rate: from step s the learning rate is cut to 0;
- memory: from step s the allocated memory ramps past 95 % of the total;
- stall and straggler (multi-rank, on a simulated clock): see ``ranked.py``.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from lmtop.hooks import schema

SPIKE_SIZES = (3, 4, 5, 6, 8, 10, 15, 20, 30, 50)
FIRST_STEP = 150  # injected events start after the detectors' warm-up


@dataclass
class Event:
    """A labelled event: its type, metric, first step and (for spikes) size in MADs."""

    type: str
    metric: str | None
    step: int
    size: float = 0.0
    rank: int = 0
    until: int | None = None  # last step an alert still counts as this event's


@dataclass
class Case:
    name: str
    messages: list[schema.Message]
    events: list[Event] = field(default_factory=list)
    steps: int = 0


def load(folder: Path) -> list[Case]:
    """The clean traces: every finished rank-0 file under ``folder``."""
    cases = []
    for path in sorted(folder.glob("*/rank-0.jsonl")):
        messages = [schema.decode(line) for line in path.read_bytes().splitlines() if line]
        if not messages or messages[-1].kind != schema.END:
            continue
        steps = sum(1 for m in messages if m.kind == schema.METRICS and "loss" in m.m)
        cases.append(Case(path.parent.name, messages, [], steps))
    return cases


def _metric_rows(case: Case, name: str) -> list[int]:
    return [i for i, m in enumerate(case.messages) if m.kind == schema.METRICS and name in m.m]


def _clone(case: Case, suffix: str) -> Case:
    messages = [
        schema.Message(m.run, m.rank, m.world, m.seq, m.t, m.kind, m.step, dict(m.m), m.data)
        for m in case.messages
    ]
    return Case(f"{case.name}/{suffix}", messages, [], case.steps)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def spikes(
    case: Case, metric: str, size: float, rng: random.Random, additive: bool = False
) -> Case:
    """One spike of ``size`` MADs every ~200 steps (one step each, well apart)."""
    out = _clone(case, f"spike-{metric}-{size}{'-add' if additive else ''}")
    rows = _metric_rows(out, metric)
    clean = [case.messages[i].m[metric] for i in rows]
    position = FIRST_STEP + rng.randrange(60)
    while position < len(rows) - 20:
        before = clean[position - 50 : position]
        median = _median(before)
        mad = _median([abs(v - median) for v in before])
        base = clean[position] if additive else median
        message = out.messages[rows[position]]
        message.m[metric] = base + size * mad
        step = message.step or 0
        out.events.append(Event("spike", metric, step, size, until=step + 5))
        position += 150 + rng.randrange(100)
    return out


def nonfinite(case: Case, metric: str, token: str, rng: random.Random) -> Case:
    """Non-finite values: a few isolated ones, or (NaN in the loss) NaN from there on."""
    out = _clone(case, f"nonfinite-{metric}-{token}")
    rows = _metric_rows(out, metric)
    value = {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}[token]
    sticky = metric == "loss" and token == "NaN"
    position = (FIRST_STEP if sticky else 5) + rng.randrange(len(rows) // 2)
    while position < len(rows):
        message = out.messages[rows[position]]
        out.events.append(Event("nonfinite", metric, message.step or 0, until=message.step))
        if sticky:
            for row in rows[position:]:
                out.messages[row].m[metric] = value
            break
        message.m[metric] = value
        position += 150 + rng.randrange(300)  # each one after the detector re-armed
    return out


def divergence(case: Case, tau: float, rng: random.Random) -> Case:
    """From step s the loss climbs towards its initial level, e-folding in ``tau`` steps."""
    out = _clone(case, f"divergence-{tau}")
    rows = _metric_rows(out, "loss")
    start = rng.randrange(600, len(rows) - 600)
    initial = _median([case.messages[i].m["loss"] for i in rows[:10]])
    for k, row in enumerate(rows[start:]):
        message = out.messages[row]
        clean = message.m["loss"]
        target = max(initial, clean * 2)
        message.m["loss"] = clean + (target - clean) * (1 - math.exp(-k / tau))
    out.events.append(Event("divergence", "loss", out.messages[rows[start]].step or 0))
    return out


def overfitting(case: Case, rate: float, rng: random.Random) -> Case:
    """From step s the eval loss rises by ``rate`` (a fraction) per evaluation."""
    out = _clone(case, f"overfitting-{rate}")
    rows = _metric_rows(out, "eval_loss")
    start = rng.randrange(5, len(rows) - 8)
    for k, row in enumerate(rows[start:], 1):
        out.messages[row].m["eval_loss"] *= 1 + rate * k
    out.events.append(Event("overfitting", "eval_loss", out.messages[rows[start]].step or 0))
    return out


def clipping(case: Case, rng: random.Random) -> Case:
    """From step s the grad norm sits above max_grad_norm (1.0) on every step."""
    out = _clone(case, "clipping")
    rows = _metric_rows(out, "grad_norm")
    start = rng.randrange(300, len(rows) - 400)
    for row in rows[start:]:
        out.messages[row].m["grad_norm"] = 1.3 + 1.7 * rng.random()
    out.events.append(Event("clipping", "grad_norm", out.messages[rows[start]].step or 0))
    return out


def learning_rate(case: Case, rng: random.Random) -> Case:
    """From step s the learning rate is 0 (a scheduler bug, a cut)."""
    out = _clone(case, "learning_rate")
    name = "lr" if "lr" in out.messages[2].m else "learning_rate"
    rows = _metric_rows(out, name)
    start = rng.randrange(300, len(rows) - 300)
    for row in rows[start:]:
        out.messages[row].m[name] = 0.0
    out.events.append(Event("learning_rate", name, out.messages[rows[start]].step or 0))
    return out


def memory(case: Case, rng: random.Random) -> Case:
    """From step s memory ramps up by 0.1 % of the total per step; the event is its 95 % step."""
    out = _clone(case, "memory")
    rows = _metric_rows(out, "memory_allocated")
    start = rng.randrange(300, len(rows) - 800)
    crossed = None
    for k, row in enumerate(rows[start:]):
        m = out.messages[row].m
        m["memory_allocated"] = min(
            m["memory_total"] * 0.99, m["memory_allocated"] + k * 0.001 * m["memory_total"]
        )
        if crossed is None and m["memory_allocated"] > 0.95 * m["memory_total"]:
            crossed = out.messages[row].step
    if crossed is not None:
        out.events.append(Event("memory", "memory_allocated", crossed))
    return out


def build(clean: list[Case], seed: int = 0, additive: bool = False) -> dict[str, list[Case]]:
    """Every labelled case, by event type (``clean`` holds the traces as they are)."""
    rng = random.Random(seed)
    cases: dict[str, list[Case]] = {"clean": clean}
    cases["spike"] = [
        spikes(c, metric, size, rng, additive)
        for c in clean
        for metric in ("loss", "grad_norm")
        for size in SPIKE_SIZES
    ]
    cases["nonfinite"] = [
        nonfinite(c, metric, token, rng)
        for c in clean
        for metric in ("loss", "grad_norm", "eval_loss")
        for token in ("NaN", "+Inf", "-Inf")
    ]
    cases["divergence"] = [divergence(c, tau, rng) for c in clean for tau in (20, 100, 400)]
    cases["overfitting"] = [overfitting(c, rate, rng) for c in clean for rate in (0.01, 0.03, 0.1)]
    cases["clipping"] = [clipping(c, rng) for c in clean]
    cases["learning_rate"] = [learning_rate(c, rng) for c in clean]
    cases["memory"] = [memory(c, rng) for c in clean]
    return cases


def copy_case(case: Case) -> Case:
    """A deep copy (the ranked builder edits clocks)."""
    return copy.deepcopy(case)
