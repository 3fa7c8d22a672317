"""The run book: every run and rank the viewer knows, keyed by the run's directory.

A run *is* its directory: two runs that share a name in two folders are two runs, and every
consumer (store, alerts, snapshots, live routing) keys runs by :attr:`Run.key`, the directory's
real path (``live:<name>`` or ``memory:<name>`` for a run without one). The name is for display.

The thread that polls the source owns the book and is the only one that changes it. Views are
taken with :meth:`RunBook.snapshot`: frozen :class:`RunView` and :class:`RankView` objects that
another thread (the UI) may read while the book moves on. Time is an input of a view: a rank's
health (silent, straggling) and a run's state (stalled, crashed) are judged at the moment the
snapshot is taken, with the same rules and settings the stall and straggler alerts use.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtop.hooks import schema

from . import rank_health
from .alert_settings import StallSettings, StragglerSettings

MISSING_RANK_GRACE = 5.0  # ranks that never showed up stop holding a finished run open
# A run's newest events kept for its marks and its list: evaluations and checkpoints are a few
# hundred in a long run; an event() every step keeps the newest.
MAX_EVENTS = 500
EVENT_TEXT_CHARS = 500
# Ranks say the same event at the same step (an evaluation, a checkpoint): the newest this many
# events are looked at to make it one event naming its ranks.
EVENT_MERGE_WINDOW = 16

LIVE, STALLED, FINISHED, FAILED, CRASHED = "live", "stalled", "finished", "failed", "crashed"


@dataclass(slots=True)
class RankState:
    """What is known of one rank of a run (owned by the polling thread)."""

    rank: int
    applied: int = -1  # seq of the last message applied
    gaps: int = 0  # messages that never arrived (seq numbers skipped)
    messages: int = 0
    bad_lines: int = 0  # lines of its file that were not messages (set by the reader)
    info: dict[str, Any] | None = None  # the start message's info
    status: str | None = None  # "ok", "error", "crashed", "unknown" once done
    error: str | None = None
    pid: int | None = None
    start_ticks: int | None = None
    host: str | None = None
    endpoint: str | None = None
    last_step: int | None = None
    started: float | None = None  # the publisher's clock at its start message
    last_t: float | None = None  # the publisher's clock at its last message
    last_seen: float = 0.0  # our monotonic clock when it last changed
    problems: dict[str, int] = field(default_factory=dict)
    points: int = 0  # metrics messages applied (the step of a message without one)
    bad_seq: int = 0  # messages whose seq jumped ahead of the rank's own sequence
    jump: tuple[int, int] | None = None  # (from, to) of the last forward jump, until confirmed
    file_seq: int = -1  # seq of the last line read from its file (the reader keeps it)
    # The last line of a read, whose seq jumps ahead: judged by the line after it, in the next
    # read (the reader keeps it).
    held: schema.Message | None = None
    ended: bool = False  # its status came from its own end line (not from the viewer's judgement)
    unreachable: bool = False  # another node's rank whose link to node 0 is down (registry)
    relayed: bool = False  # another node's rank, relayed to this one: its process is not here
    pace: rank_health.Pace = field(default_factory=rank_health.Pace)

    @property
    def done(self) -> bool:
        """Whether this rank will publish nothing more."""
        return self.status is not None


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One line on a run's timeline (an evaluation, a checkpoint, ``event()``), said by ``ranks``."""

    step: int | None
    t: float  # the publisher's clock
    text: str
    ranks: tuple[int, ...]
    data: Mapping[str, Any]


@dataclass(slots=True)
class Run:
    """One run: every rank's state, by rank."""

    key: str  # the run directory's real path, or "live:<name>" / "memory:<name>" without one
    name: str
    dir: Path | None
    ranks: dict[int, RankState] = field(default_factory=dict)
    world: int = 1
    done_since: float | None = None  # monotonic time every known rank was done
    # Replaced, never changed in place: a snapshot shares the tuple with the book.
    events: tuple[RunEvent, ...] = ()
    late_config: dict[str, Any] = field(default_factory=dict)  # config given in events

    @property
    def info(self) -> dict[str, Any]:
        """The start info of the lowest rank that has one."""
        for rank in sorted(self.ranks):
            info = self.ranks[rank].info
            if info:
                return info
        return {}

    @property
    def config(self) -> dict[str, Any]:
        """The hyper-parameters recorded at start, with those given later in events (an
        accelerate tracker's configuration, a Trainer's arguments in a run already going)."""
        config = self.info.get("config")
        config = config if isinstance(config, dict) else {}
        return {**config, **self.late_config} if self.late_config else config

    def all_done(self, now: float) -> bool:
        """Every rank has ended (or crashed) and no missing rank is still awaited."""
        if not self.ranks or not all(r.done for r in self.ranks.values()):
            return False
        if len(self.ranks) >= self.world:
            return True
        return self.done_since is not None and now - self.done_since > MISSING_RANK_GRACE


@dataclass(frozen=True, slots=True)
class RankView:
    """One rank as it stood when the snapshot was taken."""

    rank: int
    status: str | None  # "ok", "error", "crashed", "unknown" once done, else None
    health: str  # "live", "silent" or "straggler" while not done, else the status
    last_step: int | None
    started: float | None
    last_t: float | None
    silent_for: float  # seconds since it last spoke, on the viewer's clock
    step_seconds: float | None  # median seconds per step, on the publisher's clock
    host: str | None
    error: str | None
    messages: int
    gaps: int
    info: Mapping[str, Any] | None  # its start message's info (host, pid, argv, config, ...)

    @property
    def done(self) -> bool:
        """Whether this rank will publish nothing more."""
        return self.status is not None


@dataclass(frozen=True, slots=True)
class RunView:
    """One run as it stood when the snapshot was taken; safe to read from any thread."""

    key: str
    name: str
    dir: Path | None
    state: str  # live, stalled, finished, failed, crashed
    world: int
    ranks: tuple[RankView, ...]
    info: Mapping[str, Any]
    config: Mapping[str, Any]
    events: tuple[RunEvent, ...]  # the newest MAX_EVENTS, oldest first
    dropped: int  # messages that never arrived (gaps in seq), and values the hook dropped
    bad_lines: int  # lines that were not messages, and messages whose seq was not the rank's

    @property
    def started(self) -> float | None:
        """The publisher's clock at the earliest start message."""
        return min((r.started for r in self.ranks if r.started), default=None)

    @property
    def last_t(self) -> float | None:
        """The publisher's clock at the latest message."""
        return max((r.last_t for r in self.ranks if r.last_t), default=None)

    @property
    def last_step(self) -> int | None:
        """The furthest step any rank reached."""
        return max((r.last_step for r in self.ranks if r.last_step is not None), default=None)

    def rank(self, number: int) -> RankView | None:
        """One rank's view, or None."""
        return next((r for r in self.ranks if r.rank == number), None)


class RunBook:
    """Every run by key, the messages applied to them once each, and their health.

    Args:
        stall: when a rank counts as silent (the stall alert's settings).
        straggler: when a rank counts as a straggler (the straggler alert's settings).
    """

    def __init__(
        self, stall: StallSettings | None = None, straggler: StragglerSettings | None = None
    ) -> None:
        self.runs: dict[str, Run] = {}
        self._crashes: list[rank_health.Crash] = []  # found since the last health()
        self.stall = stall or StallSettings()
        self.straggler = straggler or StragglerSettings()

    def run(self, key: str, name: str, directory: Path | None) -> Run:
        """The run with ``key``, created when new."""
        run = self.runs.get(key)
        if run is None:
            run = self.runs[key] = Run(key=key, name=name, dir=directory)
        return run

    def rank(self, run: Run, number: int) -> RankState:
        """The rank ``number`` of ``run``, created when new."""
        rank = run.ranks.get(number)
        if rank is None:
            rank = run.ranks[number] = RankState(rank=number, last_seen=time.monotonic())
            run.world = max(run.world, number + 1)
            run.done_since = None
        return rank

    def apply(self, run: Run, rank: RankState, message: schema.Message) -> bool:
        """Applies a message of ``rank``; False when it is old (already applied) or late.

        A jump ahead in ``seq`` is a gap (messages lost) once the next message continues from
        it. If the next one continues the sequence from before the jump instead, the jump was
        not the rank's (a corrupt or planted line): it is counted as bad and undone, so one
        wild ``seq`` cannot hide the rest of the rank.
        """
        if rank.done:
            return False
        if message.seq <= rank.applied:
            jump = rank.jump
            if jump is None or message.seq != jump[0] + 1:
                return False
            rank.gaps -= jump[1] - jump[0] - 1
            rank.applied, rank.bad_seq = jump[0], rank.bad_seq + 1
        rank.jump = (rank.applied, message.seq) if message.seq > rank.applied + 1 else None
        rank.gaps += message.seq - rank.applied - 1
        rank.applied = message.seq
        rank.messages += 1
        rank.last_t = message.t
        rank.last_seen = time.monotonic()
        if message.step is not None:
            rank.last_step = message.step
        kind = message.kind
        if kind == schema.METRICS and message.m:
            rank.points += 1
            step = message.step if message.step is not None else rank.points - 1
            rank.pace.update(step, message.t)
        elif kind == schema.START:
            self._start(run, rank, message)
        elif kind == schema.EVENT:
            self._event(run, rank, message)
        elif kind == schema.END:
            self._end(rank, message)
        run.world = max(run.world, message.world)
        return True

    def crashed(self, run: Run, rank: RankState) -> None:
        """Marks a rank whose process is gone without an end message."""
        rank.status = "crashed"
        rank.last_seen = time.monotonic()
        self._crashes.append(rank_health.Crash(run.key, rank.rank, rank.last_step))

    def settle(self, now: float) -> None:
        """Notes the moment each run's known ranks were all done (see ``Run.all_done``)."""
        for run in self.runs.values():
            if run.done_since is None and run.ranks and all(r.done for r in run.ranks.values()):
                run.done_since = now

    def done(self, now: float) -> bool:
        """Whether every run has ended (and there is at least one)."""
        return bool(self.runs) and all(run.all_done(now) for run in self.runs.values())

    def health(self, now: float) -> list[rank_health.Episode]:
        """Judges every live run's ranks; returns the crashes found since the last call and the
        silences and stragglers that began now."""
        episodes: list[rank_health.Episode] = list(self._crashes)
        self._crashes.clear()
        for run in self.runs.values():
            if not run.all_done(now):
                episodes += rank_health.judge(
                    run.key, now, list(run.ranks.values()), self.stall, self.straggler
                )
        return episodes

    def snapshot(self, now: float | None = None) -> tuple[RunView, ...]:
        """Frozen views of every run, judged at ``now`` (the monotonic clock)."""
        now = time.monotonic() if now is None else now
        return tuple(self._view(run, now) for run in self.runs.values())

    # -- inside --------------------------------------------------------------------------------

    @staticmethod
    def _start(run: Run, rank: RankState, message: schema.Message) -> None:
        rank.started = message.t
        info = message.data.get("info")
        if isinstance(info, dict):
            rank.info = info
            pid, ticks, host = info.get("pid"), info.get("start_ticks"), info.get("host")
            rank.pid = pid if type(pid) is int else rank.pid
            rank.start_ticks = ticks if type(ticks) is int else rank.start_ticks
            rank.host = host if type(host) is str else rank.host
        if run.name != message.run and run.name == (run.dir.name if run.dir else None):
            run.name = message.run  # the launch's own name over its folder's

    @staticmethod
    def _event(run: Run, rank: RankState, message: schema.Message) -> None:
        text, data = message.data.get("text"), message.data.get("data")
        add_event(run, rank.rank, message.step, message.t, text, data)

    @staticmethod
    def _end(rank: RankState, message: schema.Message) -> None:
        status = message.data.get("status")
        rank.status = status if isinstance(status, str) and status else "ok"
        rank.ended = True
        error = message.data.get("error")
        rank.error = error if isinstance(error, str) else None
        problems = message.data.get("problems")
        if isinstance(problems, dict):
            rank.problems = {str(k): v for k, v in problems.items() if type(v) is int}

    def _view(self, run: Run, now: float) -> RunView:
        ranks = tuple(self._rank_view(run.ranks[n], now) for n in sorted(run.ranks))
        return RunView(
            key=run.key,
            name=run.name,
            dir=run.dir,
            state=self._state(run, ranks, now),
            world=run.world,
            ranks=ranks,
            info=run.info,
            config=run.config,
            events=run.events,
            dropped=sum(r.gaps + _dropped_values(r.problems) for r in run.ranks.values()),
            bad_lines=sum(r.bad_lines + r.bad_seq for r in run.ranks.values()),
        )

    def _rank_view(self, rank: RankState, now: float) -> RankView:
        seconds = rank.pace.step_seconds
        return RankView(
            rank=rank.rank,
            status=rank.status,
            health=rank.status or rank_health.health(rank, now, self.stall),
            last_step=rank.last_step,
            started=rank.started,
            last_t=rank.last_t,
            silent_for=max(0.0, now - rank.last_seen),
            step_seconds=seconds if seconds == seconds else None,
            host=rank.host,
            error=rank.error,
            messages=rank.messages,
            gaps=rank.gaps,
            info=rank.info,
        )

    def _state(self, run: Run, ranks: tuple[RankView, ...], now: float) -> str:
        statuses = {r.status for r in ranks}
        if not run.all_done(now):
            if "crashed" in statuses and None not in statuses:
                return CRASHED
            live = [r for r in ranks if not r.done]
            if live and all(r.health == rank_health.SILENT for r in live):
                return STALLED
            return LIVE
        if "crashed" in statuses:
            return CRASHED
        if statuses - {"ok", "unknown"}:
            return FAILED
        return FINISHED


def add_event(run: Run, rank: int, step: int | None, t: float, text: Any, data: Any) -> None:
    """Adds an event to the run's timeline: one event for the ranks that say it together (the
    same step and text among the newest EVENT_MERGE_WINDOW events). A config in its data joins
    the run's config."""
    text, data = _accepted(run, text, data)
    events = run.events
    for index in range(len(events) - 1, max(-1, len(events) - 1 - EVENT_MERGE_WINDOW), -1):
        seen = events[index]
        if seen.step == step and seen.text == text:
            run.events = (*events[:index], _joined(seen, rank), *events[index + 1 :])
            return
    run.events = (*events[-(MAX_EVENTS - 1) :], RunEvent(step, t, text, (rank,), data))


def restore_events(run: Run, rank: int, events: list[tuple[Any, ...]]) -> None:
    """Puts back one rank's events (from a cache, or a worker's read), merged with the same
    events of the ranks restored before it over the whole timeline: restored rank by rank, an
    evaluation every rank said is far more than EVENT_MERGE_WINDOW events back."""
    index = {(e.step, e.text): i for i, e in enumerate(run.events)}
    events_now = list(run.events)
    for step, t, text, data in events:
        text, data = _accepted(run, text, data)
        at = index.get((step, text))
        if at is None:
            index[step, text] = len(events_now)
            events_now.append(RunEvent(step, t, text, (rank,), data))
        else:
            events_now[at] = _joined(events_now[at], rank)
    events_now.sort(key=lambda e: e.t)
    run.events = tuple(events_now[-MAX_EVENTS:])


def _accepted(run: Run, text: Any, data: Any) -> tuple[str, dict[str, Any]]:
    """An event's text (cut to EVENT_TEXT_CHARS) and data as kept; its config joins the run's."""
    data = data if isinstance(data, dict) else {}
    config = data.get("config")
    if isinstance(config, dict):
        run.late_config.update(config)
    return (text[:EVENT_TEXT_CHARS] if isinstance(text, str) else ""), data


def _joined(event: RunEvent, rank: int) -> RunEvent:
    """The event, said by ``rank`` too."""
    if rank in event.ranks:
        return event
    ranks = tuple(sorted((*event.ranks, rank)))
    return RunEvent(event.step, event.t, event.text, ranks, event.data)


def _dropped_values(problems: dict[str, int]) -> int:
    """Values a rank's hook dropped, from its end message's problem counts (live frames a slow
    viewer missed are not lost: they are in the file)."""
    return sum(n for kind, n in problems.items() if "dropped" in kind and "live" not in kind)
