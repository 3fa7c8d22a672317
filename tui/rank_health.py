"""Stalled ranks and stragglers: the alerts that come from time, not from a metric's value.

Step pace is measured on the publisher's clock (the ``t`` of consecutive metrics messages, per
step), so a viewer that reads an hour of history in one second still sees each rank's true pace.
Silence is measured on the viewer's clock (``RankState.last_seen``).

These are the only rules of a rank's health: the ranks table, the header's run state and the
stall and straggler alerts all read them, with the same settings (``[alerts.stall]`` and
``[alerts.straggler]``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .alert_settings import StallSettings, StragglerSettings
from .detectors import Latch, RollingWindow

LIVE, SILENT, STRAGGLER = "live", "silent", "straggler"
# A rank of another node whose link to node 0 is down: out of reach, neither silent nor crashed.
UNREACHABLE = "unreachable"


class RankLike(Protocol):
    """What the rules read of a run book's RankState."""

    rank: int
    last_seen: float
    last_step: int | None
    pace: Pace
    unreachable: bool

    @property
    def done(self) -> bool: ...


@dataclass(slots=True)
class Pace:
    """One rank's stepping pace on the publisher's clock."""

    window: int = 20
    step: int | None = None
    t: float | None = None
    intervals: RollingWindow = field(init=False)
    # (step, seconds per step of the interval ending there): lets ranks be compared over the
    # same steps. Long enough for a rank up to ~200 steps ahead of the slowest one.
    recent: deque[tuple[int, float]] = field(init=False)
    stalled_at: float | None = None  # the last_seen of the silence already reported
    slow: Latch = field(default_factory=lambda: Latch(math.inf, 0.0))
    behind: Latch = field(default_factory=lambda: Latch(math.inf, 0.0))
    straggling: bool = False  # an episode (slow, behind or both) already reported

    def __post_init__(self) -> None:
        self.intervals = RollingWindow(self.window)
        self.recent = deque(maxlen=256)

    def update(self, step: int, t: float) -> None:
        """Takes a metrics message's step and publisher time."""
        if self.step is not None and self.t is not None and step > self.step and t >= self.t:
            seconds = (t - self.t) / (step - self.step)
            self.intervals.add(seconds)
            self.recent.append((step, seconds))
        if self.step is None or step >= self.step:
            self.step, self.t = step, t

    @property
    def step_seconds(self) -> float:
        """The median seconds per step (NaN until measured)."""
        return self.intervals.median()

    def step_seconds_until(self, step: int, window: int) -> float | None:
        """The median seconds per step of the last ``window`` intervals ending at or before
        ``step``; None while fewer than half a window of them are held."""
        chosen = sorted([x for s, x in self.recent if s <= step][-window:])
        return _median(chosen) if len(chosen) >= max(2, window // 2) else None


def silence_limit(pace: Pace, s: StallSettings) -> float:
    """Seconds of silence after which a live rank is silent: ``min_seconds``, or ``intervals``
    times its median step interval when that is longer (a slow step is not a stall)."""
    interval = pace.step_seconds
    return max(s.min_seconds, s.intervals * interval if interval == interval else 0.0)


def health(rank: RankLike, now: float, s: StallSettings) -> str:
    """``live``, ``silent``, ``straggler`` or ``unreachable`` for a rank that has not ended."""
    if rank.unreachable:
        return UNREACHABLE
    if now - rank.last_seen > silence_limit(rank.pace, s):
        return SILENT
    return STRAGGLER if rank.pace.straggling else LIVE


@dataclass(slots=True, frozen=True)
class Episode:
    """Something that began now for one rank: a silence, a straggle or a crash."""

    run: str  # the run's key
    rank: int
    step: int | None  # the rank's last step


@dataclass(slots=True, frozen=True)
class Stall(Episode):
    """A rank silent for ``silent`` seconds, beyond ``limit``, while another rank progressed."""

    silent: float
    limit: float


@dataclass(slots=True, frozen=True)
class Straggle(Episode):
    """A rank slower than the others (``kind`` "slow", ratio of step times) or behind ("lag")."""

    kind: str
    value: float
    baseline: float


@dataclass(slots=True, frozen=True)
class Crash(Episode):
    """A rank whose process is gone without an end message (``kill -9``, ``os._exit``, OOM)."""


def judge(
    run: str, now: float, ranks: list[RankLike], stall: StallSettings, straggler: StragglerSettings
) -> list[Episode]:
    """The silences and stragglers of one live run that begin now (each episode once)."""
    return [*stalls(run, now, ranks, stall), *stragglers(run, ranks, straggler)]


def stalls(run: str, now: float, ranks: Iterable[RankLike], s: StallSettings) -> list[Stall]:
    """The ranks of one live run newly found silent while another progresses."""
    live = [r for r in ranks if not r.done and not r.unreachable]
    found = []
    for rank in live:
        pace = rank.pace
        if pace.stalled_at is not None and pace.stalled_at != rank.last_seen:
            pace.stalled_at = None  # it spoke again
        limit = silence_limit(pace, s)
        silent = now - rank.last_seen
        if silent <= limit or pace.stalled_at is not None:
            continue
        if any(
            o.last_seen > rank.last_seen and now - o.last_seen <= limit
            for o in live
            if o is not rank
        ):
            pace.stalled_at = rank.last_seen
            found.append(Stall(run, rank.rank, rank.last_step, silent, limit))
    return found


def stragglers(run: str, ranks: Iterable[RankLike], s: StragglerSettings) -> list[Straggle]:
    """The ranks of one live run newly found slower than the others or far behind the leader."""
    live = [(r, r.pace) for r in ranks if not r.done]
    if len(live) < 2:
        return []
    found: dict[int, Straggle] = {}
    # Step times are compared over the same steps: up to the step every rank has reached. Ranks
    # of a data-parallel job publish a few ms apart, and when step times are uneven (a slow
    # data-loader step now and then) one interval more can move a median by half.
    common = min((p.step for _, p in live if p.step is not None), default=None)
    measured = []
    if common is not None:
        for rank, pace in live:
            seconds = pace.step_seconds_until(common, s.window)
            if seconds is not None:
                measured.append((rank, pace, seconds))
    for rank, pace, seconds in measured:
        others = sorted(x for o, _, x in measured if o is not rank)
        if not others:
            break
        typical = _median(others)
        pace.slow.high, pace.slow.low = s.ratio, s.rearm_ratio
        if typical > 0 and pace.slow.update(seconds / typical):
            found[rank.rank] = Straggle(run, rank.rank, pace.step, "slow", seconds, typical)
    stepped = [(r, p) for r, p in live if p.step is not None and p.t is not None]
    if len(stepped) >= 2:
        leader = max(stepped, key=lambda rp: rp[1].step or 0)[1]
        for rank, pace in stepped:
            assert pace.step is not None and pace.t is not None and leader.step is not None
            # Compare ranks at the same moment of the publisher's clock: a rank whose last message
            # is much older is stalled (the stall alert) or not read yet (history loading).
            interval = leader.step_seconds
            near = max(30.0, 10 * interval) if interval == interval else 30.0
            if leader.t is None or abs(leader.t - pace.t) > near:
                continue
            lag = leader.step - pace.step
            pace.behind.high, pace.behind.low = s.lag_steps, s.lag_steps / 2
            if pace.behind.update(lag) and rank.rank not in found:
                found[rank.rank] = Straggle(
                    run, rank.rank, pace.step, "lag", float(lag), float(leader.step)
                )
    # One alert per episode: a rank slow and then behind is one straggler.
    out = []
    for rank, pace in live:
        if rank.rank in found and not pace.straggling:
            out.append(found[rank.rank])
        pace.straggling = pace.slow.on or pace.behind.on
    return out


def _median(values: list[float]) -> float:
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])
