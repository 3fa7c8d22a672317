"""The alert engine: every message of every rank through streaming detectors, alerts out.

    engine = AlertEngine(AlertSettings())
    for message in follower.poll():
        for alert in engine.feed(message): ...
    for alert in engine.tick(time.monotonic(), follower.runs): ...   # stalls and stragglers

Plain Python, no Textual: the app and ``lmtop --headless`` are two views of it. State is kept per
(run, rank, metric) and bounded; each point costs a constant amount of work.

Metric names are matched after lower-casing and turning ``/ . -`` and spaces into ``_``:

- training loss: ``loss``, ``train_loss``, ``training_loss``, ``train/loss`` (spike, divergence,
  overfitting's training side);
- eval loss: ``eval_loss``, ``eval/loss``, ``val_loss``, ``validation_loss``, ``valid_loss``;
- grad norm: ``grad_norm``, ``gradient_norm``, ``train/grad_norm``, ``total_grad_norm`` (spike,
  clipping against the start config's ``max_grad_norm``, ``gradient_clipping``, ``grad_clip``,
  ``clip_grad_norm``, ``max_norm`` or ``gradient_clip_val``);
- learning rate: ``lr``, ``learning_rate``, ``train/learning_rate``, ``lr_<group>``;
- memory: a name with ``mem`` and one of ``alloc``, ``reserved``, ``used``, against a metric with
  ``mem`` and ``total`` (or the start config's ``memory_total``/``gpu_memory_total``), or a name
  with ``mem`` and ``percent``/``pct``;
- any other metric gets spike detection when named in ``[alerts.spike] metrics``.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lmtop.hooks import schema

from . import rank_health
from .alert_settings import AlertSettings
from .detectors import (
    BOTH,
    DOWN,
    UP,
    ClippingDetector,
    DivergenceDetector,
    Latch,
    LearningRateDetector,
    SpikeDetector,
)
from .learning_curve import NOT_ENOUGH_DATA, Diagnosis, LearningCurve

INFO, WARNING, CRITICAL = "info", "warning", "critical"
SEVERITIES = (INFO, WARNING, CRITICAL)

SPIKE, NONFINITE, DIVERGENCE, OVERFITTING = "spike", "nonfinite", "divergence", "overfitting"
CLIPPING, LEARNING_RATE, MEMORY, STALL, STRAGGLER = (
    "clipping",
    "learning_rate",
    "memory",
    "stall",
    "straggler",
)
TYPES = (
    SPIKE,
    NONFINITE,
    DIVERGENCE,
    OVERFITTING,
    CLIPPING,
    LEARNING_RATE,
    MEMORY,
    STALL,
    STRAGGLER,
)
SEVERITY = {
    SPIKE: WARNING,
    NONFINITE: CRITICAL,
    DIVERGENCE: CRITICAL,
    OVERFITTING: WARNING,
    CLIPPING: WARNING,
    LEARNING_RATE: WARNING,
    MEMORY: WARNING,
    STALL: CRITICAL,
    STRAGGLER: WARNING,
}

MAX_NAMES = 4096  # metric names remembered per rank (NaN episodes, classification)
MAX_RECENT = 1000
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

_SEPARATORS = re.compile(r"[/.\- ]+")
LOSS, EVAL_LOSS, GRAD_NORM, LR, MEM_USED, MEM_TOTAL, MEM_PERCENT, OTHER = range(8)


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
    if key in ("lr", "learning_rate") or re.fullmatch(r"lr_(group_?)?\d+|learning_rate_\d+", key):
        return LR
    if "mem" in key:
        if "total" in key:
            return MEM_TOTAL
        if "percent" in key or "pct" in key:
            return MEM_PERCENT
        if any(word in key for word in ("alloc", "reserved", "used")):
            return MEM_USED
    return OTHER


@dataclass(slots=True, frozen=True)
class Alert:
    """One alert: what happened, where (run, rank, metric, step) and against which baseline."""

    type: str
    severity: str
    run: str
    rank: int
    metric: str | None
    step: int | None
    value: float | None
    baseline: float | None
    message: str
    t: float | None = None  # the publisher's clock at the message that raised it

    def to_record(self) -> dict[str, Any]:
        """The headless JSON record; non-finite numbers as the protocol's string tokens."""
        return {
            "kind": "alert",
            "type": self.type,
            "severity": self.severity,
            "run": self.run,
            "rank": self.rank,
            "metric": self.metric,
            "step": self.step,
            "value": None if self.value is None else schema.finite_or_token(float(self.value)),
            "baseline": None
            if self.baseline is None
            else schema.finite_or_token(float(self.baseline)),
            "message": self.message,
            "t": self.t,
        }


@dataclass(slots=True)
class _RankAlerts:
    """Detector state of one rank."""

    spikes: dict[str, SpikeDetector] = field(default_factory=dict)
    divergence: dict[str, DivergenceDetector] = field(default_factory=dict)
    clipping: dict[str, ClippingDetector] = field(default_factory=dict)
    rates: dict[str, LearningRateDetector] = field(default_factory=dict)
    memory: dict[str, Latch] = field(default_factory=dict)
    curve: LearningCurve | None = None
    nonfinite: dict[str, int] = field(default_factory=dict)  # name -> finite points since alert
    kinds: dict[str, int] = field(default_factory=dict)
    pace: rank_health.Pace = field(default_factory=rank_health.Pace)
    points: int = 0  # metrics messages seen (the step when a message has none)


@dataclass(slots=True)
class _RunAlerts:
    config: dict[str, Any] = field(default_factory=dict)
    ranks: dict[int, _RankAlerts] = field(default_factory=dict)


class AlertEngine:
    """Turns messages into alerts; see the module docstring for the names it recognises."""

    def __init__(self, settings: AlertSettings | None = None) -> None:
        self.settings = settings or AlertSettings()
        self._runs: dict[str, _RunAlerts] = {}
        self.recent: deque[Alert] = deque(maxlen=MAX_RECENT)
        self.counts: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
        self._extra_spikes = {
            normalise(k): v for k, v in self.settings.spike.metrics.items() if v in (UP, DOWN, BOTH)
        }

    @property
    def critical(self) -> bool:
        """Whether any critical alert fired."""
        return self.counts[CRITICAL] > 0

    # -- metrics ------------------------------------------------------------------------------

    def feed(self, message: schema.Message) -> list[Alert]:
        """Takes one message (in per-rank order); returns the alerts it raised."""
        if not self.settings.enabled:
            return []
        run = self._runs.get(message.run)
        if run is None:
            run = self._runs[message.run] = _RunAlerts()
        rank = run.ranks.get(message.rank)
        if rank is None:
            rank = run.ranks[message.rank] = _RankAlerts()
        if message.kind == schema.START:
            info = message.data.get("info")
            config = info.get("config") if isinstance(info, dict) else None
            if isinstance(config, dict):
                run.config = config
            return []
        if message.kind != schema.METRICS or not message.m:
            return []
        rank.points += 1
        step = message.step if message.step is not None else rank.points - 1
        rank.pace.update(step, message.t)
        out: list[Alert] = []
        memory: dict[int, list[tuple[str, float]]] = {}
        for name, value in message.m.items():
            kind = rank.kinds.get(name)
            if kind is None:
                kind = classify(name)
                if len(rank.kinds) < MAX_NAMES:
                    rank.kinds[name] = kind
            if not math.isfinite(value):
                self._nonfinite(message, rank, name, value, step, out)
                continue
            if rank.nonfinite and name in rank.nonfinite:
                rank.nonfinite[name] += 1
                if rank.nonfinite[name] >= self.settings.nonfinite.rearm_steps:
                    del rank.nonfinite[name]
            if kind == OTHER:
                direction = self._extra_spikes.get(normalise(name)) if self._extra_spikes else None
                if direction:
                    self._spike(message, rank, name, value, step, direction, out)
                continue
            if kind == LOSS:
                self._spike(message, rank, name, value, step, UP, out)
                self._divergence(message, rank, name, value, step, out)
                self._curve(rank).train(value)
            elif kind == GRAD_NORM:
                self._spike(message, rank, name, value, step, UP, out)
                self._clipping(message, run, rank, name, value, step, out)
            elif kind == EVAL_LOSS:
                self._overfitting(message, rank, name, value, step, out)
            elif kind == LR:
                self._learning_rate(message, run, rank, name, value, step, out)
            else:
                memory.setdefault(kind, []).append((name, value))
        if memory and self.settings.memory.enabled:
            self._memory(message, run, rank, memory, step, out)
        return self._record(out)

    def _alert(
        self,
        out: list[Alert],
        message: schema.Message,
        kind: str,
        metric: str | None,
        step: int | None,
        value: float | None,
        baseline: float | None,
        text: str,
    ) -> None:
        out.append(
            Alert(
                kind,
                SEVERITY[kind],
                message.run,
                message.rank,
                metric,
                step,
                value,
                baseline,
                text,
                message.t,
            )
        )

    def _record(self, alerts: list[Alert]) -> list[Alert]:
        for alert in alerts:
            self.recent.append(alert)
            self.counts[alert.severity] += 1
        return alerts

    def _nonfinite(
        self,
        message: schema.Message,
        rank: _RankAlerts,
        name: str,
        value: float,
        step: int,
        out: list[Alert],
    ) -> None:
        if not self.settings.nonfinite.enabled:
            return
        if name in rank.nonfinite:
            rank.nonfinite[name] = 0  # still in the same episode
            return
        if len(rank.nonfinite) >= MAX_NAMES:
            rank.nonfinite.clear()
        rank.nonfinite[name] = 0
        shown = "NaN" if value != value else ("+Inf" if value > 0 else "-Inf")
        self._alert(
            out, message, NONFINITE, name, step, value, None, f"{name} is {shown} at step {step}"
        )

    def _spike(
        self,
        message: schema.Message,
        rank: _RankAlerts,
        name: str,
        value: float,
        step: int,
        direction: str,
        out: list[Alert],
    ) -> None:
        s = self.settings.spike
        if not s.enabled:
            return
        detector = rank.spikes.get(name)
        if detector is None:
            if len(rank.spikes) >= MAX_NAMES:
                return
            detector = rank.spikes[name] = SpikeDetector(s, direction)
        found = detector.update(value)
        if found is not None:
            size = found.size
            word = "drop" if found.value < found.baseline else "spike"
            self._alert(
                out,
                message,
                SPIKE,
                name,
                step,
                found.value,
                found.baseline,
                f"{name} {word} to {found.value:.4g} at step {step} "
                f"(baseline {found.baseline:.4g}, {size:.0f}× the noise)",
            )

    def _divergence(
        self,
        message: schema.Message,
        rank: _RankAlerts,
        name: str,
        value: float,
        step: int,
        out: list[Alert],
    ) -> None:
        s = self.settings.divergence
        if not s.enabled:
            return
        detector = rank.divergence.get(name)
        if detector is None:
            detector = rank.divergence[name] = DivergenceDetector(s)
        found = detector.update(value)
        if found is not None:
            self._alert(
                out,
                message,
                DIVERGENCE,
                name,
                step,
                found.value,
                found.baseline,
                f"{name} diverging at step {step}: its rolling median {found.value:.4g} is "
                f"{_percent(found.value, found.baseline)} above its best {found.baseline:.4g}",
            )

    def _curve(self, rank: _RankAlerts) -> LearningCurve:
        if rank.curve is None:
            rank.curve = LearningCurve(self.settings.overfitting)
        return rank.curve

    def _overfitting(
        self,
        message: schema.Message,
        rank: _RankAlerts,
        name: str,
        value: float,
        step: int,
        out: list[Alert],
    ) -> None:
        found = self._curve(rank).evaluate(value, step)
        if found is not None and self.settings.overfitting.enabled:
            self._alert(
                out,
                message,
                OVERFITTING,
                name,
                step,
                found.value,
                found.baseline,
                f"overfitting: {name} rose over {self.settings.overfitting.evaluations} evaluations "
                f"to {found.value:.4g}, {_percent(found.value, found.baseline)} above its best "
                f"{found.baseline:.4g}, while the training loss did not rise",
            )

    def _clipping(
        self,
        message: schema.Message,
        run: _RunAlerts,
        rank: _RankAlerts,
        name: str,
        value: float,
        step: int,
        out: list[Alert],
    ) -> None:
        s = self.settings.clipping
        if not s.enabled:
            return
        detector = rank.clipping.get(name)
        if detector is None:
            max_norm = _number(run.config, MAX_GRAD_NORM_KEYS)
            if max_norm is None or max_norm <= 0:
                return
            detector = rank.clipping[name] = ClippingDetector(s, max_norm)
        found = detector.update(value)
        if found is not None:
            self._alert(
                out,
                message,
                CLIPPING,
                name,
                step,
                value,
                found.baseline,
                f"{name} above max_grad_norm {found.baseline:g} on {found.value:.0%} of the last "
                f"{s.window} steps: the learning rate may be too high",
            )

    def _learning_rate(
        self,
        message: schema.Message,
        run: _RunAlerts,
        rank: _RankAlerts,
        name: str,
        value: float,
        step: int,
        out: list[Alert],
    ) -> None:
        if not self.settings.learning_rate.enabled:
            return
        detector = rank.rates.get(name)
        if detector is None:
            warmup = _number(run.config, WARMUP_KEYS)
            ratio, steps = (
                _number(run.config, ("warmup_ratio",)),
                _number(run.config, ("max_steps",)),
            )
            if warmup is None and ratio is not None and steps is not None:
                warmup = ratio * steps
            detector = rank.rates[name] = LearningRateDetector(
                self.settings.learning_rate, int(warmup or 0)
            )
        found = detector.update(value, step)
        if found is not None:
            why = f"cut from {found.baseline:.3g}" if found.baseline else "still zero after warm-up"
            self._alert(
                out,
                message,
                LEARNING_RATE,
                name,
                step,
                value,
                found.baseline,
                f"{name} is {value:g} at step {step}: {why}",
            )

    def _memory(
        self,
        message: schema.Message,
        run: _RunAlerts,
        rank: _RankAlerts,
        memory: dict[int, list[tuple[str, float]]],
        step: int,
        out: list[Alert],
    ) -> None:
        s = self.settings.memory
        fractions: list[tuple[str, float, float]] = []  # name, fraction, total
        for name, value in memory.get(MEM_PERCENT, []):
            fractions.append((name, value / 100, 100.0))
        totals = memory.get(MEM_TOTAL)
        total = totals[0][1] if totals else _number(run.config, MEMORY_TOTAL_KEYS)
        if total and total > 0:
            for name, value in memory.get(MEM_USED, []):
                fractions.append((name, value / total, total))
        for name, fraction, total_ in fractions:
            if fraction > 1.5:  # units that do not match (GiB against bytes): no verdict
                continue
            latch = rank.memory.get(name)
            if latch is None:
                if len(rank.memory) >= 64:
                    continue
                latch = rank.memory[name] = Latch(s.fraction, s.rearm_fraction)
            if latch.update(fraction):
                self._alert(
                    out,
                    message,
                    MEMORY,
                    name,
                    step,
                    fraction,
                    s.fraction,
                    f"{name} at {fraction:.0%} of device memory ({total_:.4g}) at step {step}",
                )

    # -- time ---------------------------------------------------------------------------------

    def tick(self, now: float, runs: Mapping[str, Any]) -> list[Alert]:
        """Stalled ranks and stragglers of the live runs, from a Follower's ``runs``.

        Args:
            now: the monotonic clock the Follower stamps ``RankState.last_seen`` with.
            runs: ``Follower.runs`` (objects with ``name``, ``ranks`` and ``all_done``).
        """
        if not self.settings.enabled:
            return []
        out: list[Alert] = []
        for run in runs.values():
            state = self._runs.get(run.name)
            if state is None or run.all_done or len(run.ranks) < 2:
                continue
            paces = {number: r.pace for number, r in state.ranks.items()}
            ranks = list(run.ranks.values())
            if self.settings.stall.enabled:
                for stall in rank_health.stalls(now, ranks, paces, self.settings.stall):
                    out.append(
                        Alert(
                            STALL,
                            SEVERITY[STALL],
                            run.name,
                            stall.rank,
                            None,
                            stall.step,
                            stall.silent,
                            stall.limit,
                            f"rank {stall.rank} silent for {stall.silent:.0f} s after step "
                            f"{stall.step} while other ranks progress",
                            paces[stall.rank].t,
                        )
                    )
            if self.settings.straggler.enabled:
                for slow in rank_health.stragglers(ranks, paces, self.settings.straggler):
                    if slow.kind == "slow":
                        text = (
                            f"rank {slow.rank} straggling: {slow.value:.3g} s per step against "
                            f"{slow.baseline:.3g} s on the other ranks"
                        )
                    else:
                        text = (
                            f"rank {slow.rank} straggling: {slow.value:.0f} steps behind the "
                            f"leading rank (step {slow.baseline:.0f})"
                        )
                    out.append(
                        Alert(
                            STRAGGLER,
                            SEVERITY[STRAGGLER],
                            run.name,
                            slow.rank,
                            "step_time" if slow.kind == "slow" else "step",
                            slow.step,
                            slow.value,
                            slow.baseline,
                            text,
                            paces[slow.rank].t,
                        )
                    )
        return self._record(out)

    # -- diagnosis ----------------------------------------------------------------------------

    def diagnose(self, run_name: str) -> Diagnosis:
        """The run's learning-curve verdict, from the rank with the most evaluations."""
        state = self._runs.get(run_name)
        curves = [r.curve for r in state.ranks.values() if r.curve] if state else []
        if not curves:
            return Diagnosis(NOT_ENOUGH_DATA, "no eval loss yet")
        return max(curves, key=lambda c: len(c.evals)).diagnose()

    def diagnosis(self, run_name: str) -> str:
        """``diagnose`` as one line, e.g. ``"overfitting: eval loss 12% above its best ..."``."""
        return str(self.diagnose(run_name))


def _number(config: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _percent(value: float, baseline: float) -> str:
    if baseline == 0 or not math.isfinite(baseline):
        return f"{value - baseline:+.3g}"
    return f"{(value - baseline) / abs(baseline):.0%}"
