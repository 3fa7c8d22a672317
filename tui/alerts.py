"""The alert engine: every message of every rank through streaming detectors, alerts out.

    engine = AlertEngine(AlertSettings())
    for key, message in follower.poll():
        for alert in engine.feed(key, message): ...
    for alert in engine.tick(follower.book.health(time.monotonic())): ...  # stalls, stragglers

Plain Python, no Textual: the app and ``lmtop --headless`` are two views of it. Runs are keyed
by their directory (see :mod:`.runbook`); state is kept per (run, rank, metric) and bounded, and
each point costs a constant amount of work. Which names are watched is :mod:`.metrics`'s
vocabulary; what is watched for is :mod:`.alert_rules`' rules.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lmtop.hooks import schema

from . import metrics, numbers, rank_health
from .alert_rules import (
    CRASHED,
    CRITICAL,
    NONFINITE,
    RULES,
    SEVERITIES,
    STALL,
    STRAGGLER,
    WARNING,
    Detector,
    RankContext,
    Rule,
)
from .alert_settings import AlertSettings
from .detectors import Finding
from .learning_curve import NOT_ENOUGH_DATA, Diagnosis, LearningCurve

MAX_NAMES = 4096  # metric names remembered per rank (detectors, NaN episodes, roles)
MAX_RECENT = 1000
MAX_FAST_NAMES = 256  # a message with more names always takes the full path (see _Rank.names)

_Plan = tuple[int, list[tuple[Rule, Detector]]] | None  # a metric's role and watchers, or None
_START, _METRICS = schema.START, schema.METRICS
_UNSEEN: Any = object()  # a metric name without a plan yet
_NONE: list[Any] = []  # "no alert", shared: never appended to (a fresh list is made instead)


@dataclass(slots=True, frozen=True, kw_only=True)
class Alert:
    """One alert: what happened, where (run, rank, metric, step) and against which baseline."""

    type: str
    severity: str
    run: str  # the run's name, for display
    key: str  # the run's key (its directory): what identifies it
    rank: int
    metric: str | None
    step: int | None
    value: float | None
    baseline: float | None
    message: str
    t: float | None = None  # the publisher's clock at the message that raised it
    ranks: tuple[int, ...] = ()  # every rank that saw it (rank is the first)

    def to_record(self) -> dict[str, Any]:
        """The headless JSON record; non-finite numbers as the protocol's string tokens."""
        number = schema.finite_or_token
        return {
            "kind": "alert",
            "type": self.type,
            "severity": self.severity,
            "run": self.run,
            "dir": self.key if os.path.isabs(self.key) else None,
            "rank": self.rank,
            "ranks": list(self.ranks or (self.rank,)),
            "metric": self.metric,
            "step": self.step,
            "value": None if self.value is None else number(float(self.value)),
            "baseline": None if self.baseline is None else number(float(self.baseline)),
            "message": self.message,
            "t": self.t,
        }


@dataclass(slots=True)
class _Rank:
    """Detector state of one rank."""

    context: RankContext
    # name -> (its role, the rules that watch it with their detectors), built on first sight
    plans: dict[str, _Plan] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)  # name -> finite points since alert
    points: int = 0  # metrics messages seen (the step when a message has none)
    # The names of the rank's last message and the plans among them that watch something: a
    # rank sends the same names step after step, and a finite message with those names goes
    # straight to its watched metrics (see AlertEngine._feed).
    names: frozenset[str] = frozenset()
    watched: list[tuple[str, Rule, Detector]] = field(default_factory=list)  # in rule order
    totals: list[str] = field(default_factory=list)  # the device-memory totals among them


class AlertEngine:
    """Turns messages into alerts with :data:`~.alert_rules.RULES`."""

    def __init__(self, settings: AlertSettings | None = None) -> None:
        self.settings = s = settings or AlertSettings()
        self._ranks: dict[tuple[str, int], _Rank] = {}
        self._configs: dict[str, dict[str, Any]] = {}  # run key -> start config
        self._names: dict[str, str] = {}  # run key -> run name
        self._rules: dict[int, list[Rule]] = {}
        for rule in RULES:
            if rule.enabled(s):
                for role in rule.roles:
                    self._rules.setdefault(role, []).append(rule)
        self._extra = {metrics.normalise(k): v for k, v in s.spike.metrics.items()}
        self.recent: deque[Alert] = deque(maxlen=MAX_RECENT)
        self.counts: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
        self._once = OnceAcrossRanks()

    @property
    def critical(self) -> bool:
        """Whether any critical alert fired."""
        return self.counts[CRITICAL] > 0

    def feed(self, key: str, message: schema.Message) -> list[Alert]:
        """Takes one message of run ``key`` (in per-rank order); returns the alerts it raised."""
        if not self.settings.enabled:
            return []
        alerts = self._feed(key, message)
        if not alerts:  # most messages: nothing more to pay for
            return []
        for alert in alerts:
            self._once.add(0, alert)
        return [alert for _, alert in self._tell()]

    def feed_batch(self, batch: Sequence[tuple[str, schema.Message]]) -> list[tuple[int, Alert]]:
        """The alerts a batch of (run key, message) raised, each with the index of the last
        message it stands for: one event seen by several ranks (a NaN, an all-reduced grad
        norm's spike) is one alert naming the ranks, and is not told again in a later batch."""
        if not self.settings.enabled:
            return []
        once, feed = self._once, self._feed
        raised = False
        for index, (key, message) in enumerate(batch):
            alerts = feed(key, message)
            if alerts:  # rare: most messages raise nothing, and pay for nothing more
                raised = True
                for alert in alerts:
                    once.add(index, alert)
        return self._tell() if raised else []

    def raised(self, key: str, message: schema.Message) -> list[Alert]:
        """The alerts one message raised on its own rank, before the merge across ranks and
        unrecorded (what a history worker sends its parent, which merges and records them)."""
        return self._feed(key, message) if self.settings.enabled else []

    def points(self, key: str, rank: int) -> int:
        """How many metrics messages of the rank the engine took (the next step of a rank
        whose messages carry none)."""
        state = self._ranks.get((key, rank))
        return state.points if state is not None else 0

    def record(self, alerts: list[Alert]) -> list[Alert]:
        """Counts alerts merged elsewhere (:class:`OnceByStep`) as told: the critical flag,
        the recent list."""
        for alert in alerts:
            self.recent.append(alert)
            self.counts[alert.severity] += 1
        return alerts

    def _tell(self) -> list[tuple[int, Alert]]:
        """The alerts gathered in ``_once`` since the last call, recorded."""
        told = self._once.take()
        self.record([alert for _, alert in told])
        return told

    def _feed(self, key: str, message: schema.Message) -> list[Alert]:
        self._names[key] = message.run
        kind = message.kind
        if kind == _START:
            info = message.data.get("info")
            config = info.get("config") if isinstance(info, dict) else None
            if isinstance(config, dict):
                self._configs[key] = config
                for (run, _), rank in self._ranks.items():
                    if run == key:
                        rank.context.config = config
            return []
        values = message.m
        if kind != _METRICS or not values:
            return _NONE
        rank = self._ranks.get((key, message.rank)) or self._rank(key, message.rank)
        rank.points += 1
        step = message.step if message.step is not None else rank.points - 1
        nonfinite = rank.nonfinite
        if not nonfinite and values.keys() == rank.names:
            try:
                total = sum(values.values())  # NaN or ±Inf anywhere makes the sum not finite
            except TypeError:
                total = math.nan
            if total - total == 0.0:
                # Only the watched metrics (the rest of _feed looks at every one).
                out = _NONE
                for name in rank.totals:
                    rank.context.memory_total = values[name]
                for name, rule, detector in rank.watched:
                    found = detector(values[name], step)
                    if found is not None:
                        out = self._found(key, message, rank, rule, name, step, found, out)
                return out
        out = _NONE
        plans = rank.plans
        # The hot loop: one dict lookup per metric, and nothing more for the many metrics that
        # no rule watches (their plan is None) unless a value is not finite.
        for name, value in values.items():
            plan = plans.get(name, _UNSEEN)
            if plan is _UNSEEN:
                plan = self._plan(rank, name)
            if value - value != 0.0:  # NaN or ±Inf
                if out is _NONE:
                    out = []
                self._nonfinite(key, message, rank, name, value, step, out)
                continue
            if nonfinite and name in nonfinite:
                nonfinite[name] += 1
                if nonfinite[name] >= self.settings.nonfinite.rearm_steps:
                    del nonfinite[name]
            if plan is None:
                continue
            role, watched = plan
            if role == metrics.MEM_TOTAL:
                rank.context.memory_total = value
            for rule, detector in watched:
                found = detector(value, step)
                if found is not None:
                    out = self._found(key, message, rank, rule, name, step, found, out)
        if len(values) <= MAX_FAST_NAMES and all(name in plans for name in values):
            rank.names = frozenset(values)
            fast = [(name, plan) for name in values if (plan := plans[name]) is not None]
            rank.watched = [(name, *pair) for name, (_, watched) in fast for pair in watched]
            rank.totals = [name for name, (role, _) in fast if role == metrics.MEM_TOTAL]
        return out

    def _found(
        self,
        key: str,
        message: schema.Message,
        rank: _Rank,
        rule: Rule,
        name: str,
        step: int,
        found: Finding,
        out: list[Alert],
    ) -> list[Alert]:
        """``out`` (a fresh list for the shared empty one) with the alert ``found`` raises."""
        if rule.refine is not None:
            found = rule.refine(rank.context, name, step, found)
        severity = rule.severity or found.severity
        text = rule.word(self.settings, name, step, found)
        if out is _NONE:
            out = []
        out.append(self._alert(key, message, rule.type, severity, name, step, text,
                               value=found.value, baseline=found.baseline))  # fmt: skip
        return out

    def _plan(self, rank: _Rank, name: str) -> _Plan:
        """What watches metric ``name`` of a rank: its role and each rule's detector (None when
        nothing does and the metric is no device-memory total)."""
        role = metrics.classify(name)
        watched = []
        for rule in self._rules.get(role, ()):
            detector = rule.build(self.settings, rank.context, name)
            if detector is not None:
                watched.append((rule, detector))
        plan = (role, watched) if watched or role == metrics.MEM_TOTAL else None
        if len(rank.plans) < MAX_NAMES:  # past that, names are judged afresh (and forgotten)
            rank.plans[name] = plan
        return plan

    def tick(self, episodes: list[rank_health.Episode]) -> list[Alert]:
        """Alerts for the silences and stragglers a run book's ``health`` found."""
        out = []
        s = self.settings
        for e in episodes if s.enabled else ():
            if isinstance(e, rank_health.Straggle):
                wanted = s.straggler.enabled
            else:
                wanted = s.stall.enabled if isinstance(e, rank_health.Stall) else True
            if wanted:
                type_, severity, metric, value, baseline, text = _word_episode(e)
                out.append(
                    Alert(type=type_, severity=severity, run=self._names.get(e.run, e.run),
                          key=e.run, rank=e.rank, metric=metric, step=e.step, value=value,
                          baseline=baseline, message=text)
                )  # fmt: skip
        return self.record(out)

    def diagnose(self, key: str) -> Diagnosis:
        """The run's learning-curve verdict, from the rank with the most evaluations."""
        curves = [r.context.curve for (run, _), r in self._ranks.items() if run == key]
        curves = [c for c in curves if c.evals]
        if not curves:
            return Diagnosis(NOT_ENOUGH_DATA, "no eval loss yet")
        return max(curves, key=lambda c: len(c.evals)).diagnose()

    # -- inside --------------------------------------------------------------------------------

    def _rank(self, key: str, number: int) -> _Rank:
        rank = self._ranks.get((key, number))
        if rank is None:
            context = RankContext(
                config=self._configs.get(key, {}),
                curve=LearningCurve(self.settings.overfitting),
                extra_spikes=self._extra,
            )
            rank = self._ranks[(key, number)] = _Rank(context)
        return rank

    def _alert(
        self,
        key: str,
        message: schema.Message,
        type_: str,
        severity: str,
        metric: str | None,
        step: int | None,
        text: str,
        *,
        value: float | None,
        baseline: float | None,
    ) -> Alert:
        return Alert(
            type=type_,
            severity=severity,
            run=message.run,
            key=key,
            rank=message.rank,
            metric=metric,
            step=step,
            value=value,
            baseline=baseline,
            message=text,
            t=message.t,
        )

    def _nonfinite(
        self,
        key: str,
        message: schema.Message,
        rank: _Rank,
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
        out.append(
            self._alert(
                key,
                message,
                NONFINITE,
                CRITICAL,
                name,
                step,
                f"{name} is {shown} at step {step}",
                value=value,
                baseline=None,
            )
        )


def _word_episode(e: rank_health.Episode) -> tuple[str, str, str | None, float, float, str]:
    """(type, severity, metric, value, baseline, message) of a crash, a stall or a straggler."""
    if isinstance(e, rank_health.Crash):
        after = "before its first step" if e.step is None else f"after step {e.step}"
        text = f"rank {e.rank} exited without an end message {after} (killed, os._exit or OOM?)"
        return CRASHED, CRITICAL, None, math.nan, math.nan, text
    if isinstance(e, rank_health.Stall):
        text = f"rank {e.rank} silent for {numbers.duration(e.silent)} after step {e.step} while other ranks progress"
        return STALL, CRITICAL, None, e.silent, e.limit, text
    assert isinstance(e, rank_health.Straggle)
    if e.kind == "slow":
        text = (
            f"rank {e.rank} straggling: {numbers.number(e.value)} s per step against "
            f"{numbers.number(e.baseline)} s on the other ranks"
        )
        return STRAGGLER, WARNING, "step_time", e.value, e.baseline, text
    text = f"rank {e.rank} straggling: {e.value:.0f} steps behind the leading rank (step {e.baseline:.0f})"
    return STRAGGLER, WARNING, "step", e.value, e.baseline, text


class OnceAcrossRanks:
    """Folds one event seen by several ranks (same run, type, metric and step) into one alert.

    Within a batch the alerts are merged (the ranks named, the gravest severity kept); an event
    already told in an earlier batch is not told again. Ranks of one step usually arrive in
    one batch: a poll reads every rank's file, and live ranks publish within milliseconds.
    """

    def __init__(self, remember: int = 4096) -> None:
        self._told: OrderedDict[tuple[str, str, str | None, int | None], None] = OrderedDict()
        self._batch: dict[tuple[str, str, str | None, int | None], tuple[int, Alert]] = {}
        self._remember = remember

    def add(self, index: int, alert: Alert) -> None:
        """One alert, raised by the message at ``index`` of the batch."""
        event = (alert.key, alert.type, alert.metric, alert.step)
        if event in self._told:
            return
        held = self._batch.get(event)
        self._batch[event] = (index, alert if held is None else _merged(held[1], alert))

    def take(self) -> list[tuple[int, Alert]]:
        """The batch's alerts, in the order their events were first raised."""
        out = list(self._batch.values())
        for event in self._batch:
            self._told[event] = None
        while len(self._told) > self._remember:
            self._told.popitem(last=False)
        self._batch.clear()
        return [(index, _named(alert)) for index, alert in out]


class OnceByStep:
    """Folds one event seen by several ranks into one alert where the ranks are read apart
    (history workers, each a few ranks a chunk at a time; see :mod:`.history_workers`).

    An event (run, type, metric, step) is held until every rank of its run has gone past it,
    then told once, naming every rank that raised it, after every message that raised it.
    Where a rank is, and where an event is, is a position (generation, step): a rank's
    generation counts its start messages, so a run resumed from a checkpoint in the same files
    (a new start, steps going back) is behind its replayed steps, not past them. A rank's
    position is the highest step its read reached in its generation, less the largest step
    back any rank of the run has shown (an evaluation logged at an earlier step than the
    training step before it: its alert may come after the training steps that follow).

    Where that falls short, an event is told naming fewer ranks than one process would (the
    rest are not told again): a run's first step back, reached by a rank read ahead of the
    others; ranks of one run with different numbers of starts in their files (a run resumed
    with more ranks, in the same directory). An event already told is not told again. What is
    held is bounded by how far apart the ranks' reads are.
    """

    def __init__(self, ranks: dict[str, list[int]], remember: int = 4096) -> None:
        # run key -> rank -> its position (END once its file is read to the end)
        self._at: dict[str, dict[int, tuple[float, float]]] = {
            key: dict.fromkeys(numbers, _BEFORE) for key, numbers in ranks.items()
        }
        self._lag: dict[str, float] = {}  # run key -> the largest step back a rank showed
        self._held: dict[tuple[str, str, str | None, int | None], tuple[Alert, int]] = {}
        self._told: OrderedDict[tuple[str, str, str | None, int | None], None] = OrderedDict()
        self._remember = remember

    def add(self, alert: Alert, generation: int = 0) -> None:
        """One alert, as one rank raised it in its ``generation``."""
        event = (alert.key, alert.type, alert.metric, alert.step)
        if event in self._told:
            return
        held = self._held.get(event)
        if held is None:
            self._held[event] = (alert, generation)
        else:
            self._held[event] = (_merged(held[0], alert), max(held[1], generation))

    def advance(self, key: str, rank: int, position: tuple[float, float], lag: float = 0) -> None:
        """Rank ``rank`` of run ``key`` is at ``position`` (:data:`END`: read to its end), and
        has gone back by as much as ``lag`` steps."""
        self._at.setdefault(key, {})[rank] = position
        if lag > self._lag.get(key, 0):
            self._lag[key] = lag

    def take(self) -> list[tuple[Alert, int]]:
        """The events every rank of their run has gone past, in the order first raised, each
        with the generation it was raised in."""
        if not self._held:
            return []
        behind = {}
        for key, at in self._at.items():
            generation, top = min(at.values(), default=END)
            behind[key] = (generation, top - self._lag.get(key, 0))
        out = []
        for event, (alert, raised_in) in list(self._held.items()):
            step = event[3]
            if step is None or behind.get(event[0], END) > (raised_in, step):
                del self._held[event]
                self._told[event] = None
                out.append((_named(alert), raised_in))
        while len(self._told) > self._remember:
            self._told.popitem(last=False)
        return out

    def rest(self) -> list[tuple[Alert, int]]:
        """Every event still held (the history ended, or no more is judged), in the order
        first raised."""
        for at in self._at.values():
            for rank in at:
                at[rank] = END
        return self.take()


END = (math.inf, math.inf)  # the position of a rank read to its end
_BEFORE = (-math.inf, -math.inf)  # of a rank not read yet


def _merged(held: Alert, other: Alert) -> Alert:
    """One alert for an event two alerts (of one rank or several each) stand for: every rank
    named, the gravest severity, and the lowest rank's words and values, whichever came first
    (so they do not depend on how far a read reached in each rank's file)."""
    ranks = tuple(sorted({*(held.ranks or (held.rank,)), *(other.ranks or (other.rank,))}))
    grave = max(held.severity, other.severity, key=SEVERITIES.index)
    first = other if other.rank < held.rank else held
    return replace(first, rank=ranks[0], ranks=ranks, severity=grave)


def _named(alert: Alert) -> Alert:
    """The message names the ranks when there are several."""
    if len(alert.ranks) < 2:
        return alert
    return replace(alert, message=f"{alert.message} (ranks {_spans(alert.ranks)})")


def _spans(ranks: tuple[int, ...]) -> str:
    """``(0, 1, 2, 3, 6)`` -> ``"0-3, 6"``."""
    parts = []
    start = previous = ranks[0]
    for rank in (*ranks[1:], None):
        if rank is None or rank != previous + 1:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = rank if rank is not None else start
        previous = rank if rank is not None else previous
    return ", ".join(parts)
