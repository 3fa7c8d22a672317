"""One small rule per alert type: what it watches, how it builds its detector, how it words it.

A rule watches metric *roles* (see :mod:`.metrics`). For each metric name of a rank that has one
of those roles, the engine asks the rule to ``build`` a detector once, then feeds it every finite
value with its step; a detector returns a :class:`~.detectors.Finding` when a new episode starts,
and the rule's ``word`` turns it into the alert's message. NaN/Inf (any metric) and the
time-driven stall and straggler alerts are not metric rules; the engine words them itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import metrics
from .alert_settings import AlertSettings
from .detectors import (
    BOTH,
    DOWN,
    UP,
    ClippingDetector,
    DivergenceDetector,
    Finding,
    Latch,
    LearningRateDetector,
    TailSpikeDetector,
)
from .learning_curve import NOT_ENOUGH_DATA, LearningCurve
from .numbers import number

INFO, WARNING, CRITICAL = "info", "warning", "critical"
SEVERITIES = (INFO, WARNING, CRITICAL)

SPIKE, NONFINITE, DIVERGENCE, OVERFITTING = "spike", "nonfinite", "divergence", "overfitting"
CLIPPING, LEARNING_RATE, MEMORY, STALL, STRAGGLER, CRASHED = (
    "clipping",
    "learning_rate",
    "memory",
    "stall",
    "straggler",
    "crashed",
)
LEARNING_CURVE = "learning_curve"  # info: the run's under/over/well-fit verdict changed

FOLLOW_STEPS = 5  # a loss spike this many steps after a grad-norm spike is the same event

Detector = Callable[[float, int], Finding | None]  # (value, step) -> a new episode, or None


@dataclass(slots=True)
class RankContext:
    """What a rule may consult about the rank it builds a detector for."""

    config: dict[str, Any]  # the run's start config
    curve: LearningCurve  # the rank's training and eval losses, shared by two rules
    memory_total: float | None = None  # a device-memory total published by the rank
    extra_spikes: dict[str, str] = field(default_factory=dict)  # normalised name -> direction
    grad_spike: int | None = None  # the step of the rank's last grad-norm spike


@dataclass(frozen=True, slots=True)
class Rule:
    """One alert type over metric values."""

    type: str
    severity: str | None  # None: the detector's finding says (spikes: info, warning)
    roles: tuple[int, ...]
    enabled: Callable[[AlertSettings], bool]
    build: Callable[[AlertSettings, RankContext, str], Detector | None]
    word: Callable[[AlertSettings, str, int, Finding], str]
    # What a finding means in the rank's context (name, step): asked of findings alone, so the
    # detector itself is called bare for every point
    refine: Callable[[RankContext, str, int, Finding], Finding] | None = None


def _percent(value: float, baseline: float) -> str:
    if baseline == 0 or baseline != baseline or abs(baseline) == float("inf"):
        return f"{'+' if value >= baseline else ''}{number(value - baseline)}"
    return f"{(value - baseline) / abs(baseline):.0%}"


def _values(detector: Any) -> Detector:
    """A detector's ``update(value, step=0)``, which judges values alone, as the rule's detector
    (its bound method: no wrapper to call per point)."""
    return detector.update


def _spike(s: AlertSettings, ctx: RankContext, name: str) -> Detector | None:
    role = metrics.classify(name)
    direction = (
        UP
        if role in (metrics.LOSS, metrics.GRAD_NORM)
        else ctx.extra_spikes.get(metrics.normalise(name))
    )
    if direction not in (UP, DOWN, BOTH):
        return None
    return TailSpikeDetector(s.spike, direction, loss=role == metrics.LOSS).update


def _refine_spike(ctx: RankContext, name: str, step: int, found: Finding) -> Finding:
    """A grad-norm spike is remembered; a loss spike that follows one within a few steps is
    worth a look (a warning)."""
    role = metrics.classify(name)
    if role == metrics.GRAD_NORM:
        ctx.grad_spike = step
    elif (
        role == metrics.LOSS
        and ctx.grad_spike is not None
        and 0 <= step - ctx.grad_spike <= FOLLOW_STEPS
        and found.severity == INFO
    ):
        note = f"it follows a grad norm spike at step {ctx.grad_spike}"
        found = replace(found, severity=WARNING, note=note)
    return found


def _word_spike(s: AlertSettings, name: str, step: int, f: Finding) -> str:
    usual = (
        f"; this run's usual max is {f.usual_ratio:.1f}×" if f.usual_ratio == f.usual_ratio else ""
    )
    usual += f"; {f.note}" if f.note else ""
    value, median = number(f.value, 4), number(f.baseline, 4)
    if f.value < f.baseline and f.value > 0:
        return (
            f"{name} dropped to {value} at step {step}, "
            f"{f.baseline / f.value:.1f}× below its median {median}{usual}"
        )
    if f.ratio == f.ratio:
        return f"{name} {value} at step {step}, {f.ratio:.1f}× its median {median}{usual}"
    return f"{name} spike to {value} at step {step} (median {median})"


def _divergence(s: AlertSettings, ctx: RankContext, name: str) -> Detector:
    return _values(DivergenceDetector(s.divergence))


def _word_divergence(s: AlertSettings, name: str, step: int, f: Finding) -> str:
    return (
        f"{name} diverging at step {step}: its rolling median {number(f.value, 4)} is "
        f"{_percent(f.value, f.baseline)} above its best {number(f.baseline, 4)}"
    )


def _overfitting(s: AlertSettings, ctx: RankContext, name: str) -> Detector:
    curve = ctx.curve
    if metrics.classify(name) == metrics.LOSS:
        return curve.train  # the training side: never alerts

    def evaluate(value: float, step: int) -> Finding | None:
        found = curve.evaluate(value, step)  # fed even with the alert off: the diagnosis reads it
        return found if s.overfitting.enabled else None

    return evaluate


def _word_overfitting(s: AlertSettings, name: str, step: int, f: Finding) -> str:
    return (
        f"overfitting: {name} rose over {s.overfitting.evaluations} evaluations "
        f"to {number(f.value, 4)}, {_percent(f.value, f.baseline)} above its best "
        f"{number(f.baseline, 4)}, while the training loss did not rise"
    )


def _learning_curve(s: AlertSettings, ctx: RankContext, name: str) -> Detector:
    """The rank's learning-curve verdict, told once it held for ``overfitting.hold``
    evaluations (runs after the overfitting rule, which adds each evaluation to the curve).
    A verdict told before needs twice the hold it needed the last time: a curve on the line
    between two verdicts (flat, evaluated every step) says so a few times, not at every flip."""
    told, label, held = "", "", 0
    needs: dict[str, int] = {}  # the hold each verdict needs, doubled each time it is told

    def update(value: float, step: int) -> Finding | None:
        nonlocal told, label, held
        now = ctx.curve.label()
        held = held + 1 if now == label else 1
        label = now
        need = needs.get(label, s.overfitting.hold)
        if label in (NOT_ENOUGH_DATA, told) or held < need:
            return None
        told, needs[label] = label, 2 * need
        return Finding(value, math.nan, severity=INFO, note=str(ctx.curve.diagnose()))

    return update


def _clipping(s: AlertSettings, ctx: RankContext, name: str) -> Detector | None:
    max_norm = metrics.max_grad_norm(ctx.config)
    return None if max_norm is None else _values(ClippingDetector(s.clipping, max_norm))


def _word_clipping(s: AlertSettings, name: str, step: int, f: Finding) -> str:
    return (
        f"{name} above max_grad_norm {f.baseline:g} on {f.value:.0%} of the last "
        f"{s.clipping.window} steps: the learning rate may be too high"
    )


def _learning_rate(s: AlertSettings, ctx: RankContext, name: str) -> Detector:
    return LearningRateDetector(s.learning_rate, metrics.warmup_steps(ctx.config)).update


def _word_learning_rate(s: AlertSettings, name: str, step: int, f: Finding) -> str:
    why = f"cut from {number(f.baseline)}" if f.baseline else "still zero after warm-up"
    return f"{name} is {number(f.value)} at step {step}: {why}"


def _memory(s: AlertSettings, ctx: RankContext, name: str) -> Detector:
    latch = Latch(s.memory.fraction, s.memory.rearm_fraction)
    percent = metrics.classify(name) == metrics.MEM_PERCENT
    # The config's total, looked up again only when a start message brings a new config.
    config: dict[str, Any] | None = None
    config_total: float | None = None

    def update(value: float, step: int) -> Finding | None:
        nonlocal config, config_total
        if percent:
            total: float | None = 100.0
        elif ctx.memory_total:
            total = ctx.memory_total
        else:
            if ctx.config is not config:
                config = ctx.config
                config_total = metrics.config_number(config, metrics.MEMORY_TOTAL_KEYS)
            total = config_total
        if not total or total <= 0:
            return None
        fraction = value / total
        if fraction > 1.5:  # units that do not match (GiB against bytes): no verdict
            return None
        return Finding(fraction, s.memory.fraction, scale=total) if latch.update(fraction) else None

    return update


def _word_memory(s: AlertSettings, name: str, step: int, f: Finding) -> str:
    return f"{name} at {f.value:.0%} of device memory ({number(f.scale, 4)}) at step {step}"


RULES = (
    Rule(
        SPIKE,
        None,
        (metrics.LOSS, metrics.GRAD_NORM, metrics.OTHER),
        lambda s: s.spike.enabled,
        _spike,
        _word_spike,
        _refine_spike,
    ),
    Rule(
        DIVERGENCE,
        CRITICAL,
        (metrics.LOSS,),
        lambda s: s.divergence.enabled,
        _divergence,
        _word_divergence,
    ),
    Rule(
        OVERFITTING,
        WARNING,
        (metrics.LOSS, metrics.EVAL_LOSS),
        lambda s: True,  # see _overfitting
        _overfitting,
        _word_overfitting,
    ),
    Rule(
        LEARNING_CURVE,
        INFO,
        (metrics.EVAL_LOSS,),
        lambda s: True,
        _learning_curve,
        lambda s, name, step, f: f.note,
    ),
    Rule(
        CLIPPING,
        INFO,  # advice about the recipe, not an incident: many healthy runs clip all along
        (metrics.GRAD_NORM,),
        lambda s: s.clipping.enabled,
        _clipping,
        _word_clipping,
    ),
    Rule(
        LEARNING_RATE,
        WARNING,
        (metrics.LR,),
        lambda s: s.learning_rate.enabled,
        _learning_rate,
        _word_learning_rate,
    ),
    Rule(
        MEMORY,
        WARNING,
        (metrics.MEM_USED, metrics.MEM_PERCENT),
        lambda s: s.memory.enabled,
        _memory,
        _word_memory,
    ),
)
