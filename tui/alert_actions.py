"""What happens beyond the screen when an alert fires: ``--on-alert CMD`` and critical snapshots.

- :class:`AlertCommand` runs a shell command per alert with the alert's JSON record on stdin,
  without waiting for it, at most ``per_minute`` times a minute (the rest are counted).
- :class:`Snapshots` writes, around each critical alert, every metric of every rank of that run
  from 50 steps before to 50 steps after, as JSON lines, into ``<run dir>/alerts/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from lmtop.hooks import schema

from . import rank_health
from .alert_settings import AlertSettings
from .alerts import CRITICAL, WARNING, Alert, AlertEngine
from .learning_curve import Diagnosis
from .owned import create_new, owned_dir_fd

SNAPSHOT_STEPS = 50
MAX_RUNNING = 4


class AlertCommand:
    """Runs ``command`` for each alert, its JSON record on stdin; never blocks the viewer."""

    def __init__(self, command: str, per_minute: int = 6) -> None:
        self.command = command
        self.per_minute = per_minute
        self.skipped = 0
        self.failed = 0
        self._started: deque[float] = deque()
        self._running: list[subprocess.Popen[bytes]] = []

    def __call__(self, alert: Alert) -> bool:
        """Starts the command for ``alert``; False when rate-limited or it could not start."""
        now = time.monotonic()
        while self._started and now - self._started[0] > 60.0:
            self._started.popleft()
        self._running = [p for p in self._running if p.poll() is None]
        if len(self._started) >= self.per_minute or len(self._running) >= MAX_RUNNING:
            self.skipped += 1
            return False
        try:
            process = subprocess.Popen(
                self.command,
                shell=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            assert process.stdin is not None
            # One record is far below a pipe's buffer: this write does not block.
            process.stdin.write(orjson.dumps(alert.to_record()) + b"\n")
            process.stdin.close()
        except (OSError, ValueError):
            self.failed += 1
            return False
        self._started.append(now)
        self._running.append(process)
        return True

    def close(self) -> None:
        """Reaps finished commands and reports what was skipped (running ones are left be)."""
        self._running = [p for p in self._running if p.poll() is None]
        if self.skipped or self.failed:
            print(
                f"lmtop: --on-alert: {self.skipped} alerts rate-limited, {self.failed} failed to start",
                file=sys.stderr,
            )


class Snapshots:
    """Every metric ±50 steps around each critical alert, written into the run's directory."""

    def __init__(self) -> None:
        self._recent: dict[tuple[str, int], deque[schema.Message]] = {}  # (run key, rank)
        self._pending: list[tuple[Alert, Path, list[schema.Message]]] = []
        self._world: dict[str, int] = {}  # run key -> its world size, from its messages
        self._ended: set[tuple[str, int]] = set()  # (run key, rank) that will say nothing more
        self.written: list[Path] = []
        self.errors = 0

    def observe(self, key: str, message: schema.Message) -> None:
        """Takes every message of run ``key`` (before the alerts it raised are given)."""
        if message.kind == schema.END:
            self.ended(key, message.rank)
            return
        if message.kind != schema.METRICS or message.step is None:
            return
        self._world[key] = max(message.world, self._world.get(key, 1))
        recent = self._recent.get((key, message.rank))
        if recent is None:
            recent = self._recent[(key, message.rank)] = deque(maxlen=4 * SNAPSHOT_STEPS)
        recent.append(message)
        for alert, _, lines in self._pending:
            if alert.key == key and abs(message.step - (alert.step or 0)) <= SNAPSHOT_STEPS:
                lines.append(message)
        self._flush(done=False)

    def observe_batch(self, batch: Sequence[tuple[str, schema.Message]]) -> None:
        """:meth:`observe` for each message of ``batch``, in order. While no snapshot waits for
        its steps after, only each rank's last messages can still matter (the ring keeps
        4 × SNAPSHOT_STEPS): a history's batch of thousands costs a look at each, no more."""
        if self._pending:
            for key, message in batch:
                self.observe(key, message)
            return
        keep = 4 * SNAPSHOT_STEPS
        taken: dict[tuple[str, int], int] = {}
        tail: list[tuple[tuple[str, int], schema.Message]] = []
        worlds = self._world
        for key, message in reversed(batch):
            kind = message.kind
            if kind == schema.END:
                self._ended.add((key, message.rank))
                continue
            if kind != schema.METRICS or message.step is None:
                continue
            if message.world > worlds.get(key, 0):
                worlds[key] = message.world
            rank = (key, message.rank)
            count = taken.get(rank, 0)
            if count < keep:
                taken[rank] = count + 1
                tail.append((rank, message))
        for rank, message in reversed(tail):
            recent = self._recent.get(rank)
            if recent is None:
                recent = self._recent[rank] = deque(maxlen=keep)
            recent.append(message)

    def alert(self, alert: Alert, run_dir: Path | None) -> None:
        """Starts a snapshot for a critical alert of a run with a directory."""
        if alert.severity != CRITICAL or run_dir is None or alert.step is None:
            return
        lines = [
            m
            for (run, _), recent in self._recent.items()
            if run == alert.key
            for m in recent
            if m.step is not None and abs(m.step - alert.step) <= SNAPSHOT_STEPS
        ]
        self._pending.append((alert, run_dir, lines))

    def close(self) -> None:
        """Writes the snapshots still waiting for their 50 steps after."""
        self._flush(done=True)

    def ended(self, key: str, rank: int) -> None:
        """A rank of run ``key`` will say nothing more (its end, or its crash)."""
        self._ended.add((key, rank))
        self._flush(done=False)

    def _flush(self, done: bool) -> None:
        keep = []
        for alert, run_dir, lines in self._pending:
            ranks_past = [
                (rank, recent[-1].step)
                for (run, rank), recent in self._recent.items()
                if run == alert.key and recent
            ]
            # Complete once every rank of the run (not only those seen so far: a viewer may read
            # rank 0's whole file before rank 1's) is 50 steps past the alert, or has ended (a
            # crash, a NaN near the end of the run: those steps will never come).
            complete = len(ranks_past) >= self._world.get(alert.key, 1) and all(
                (step or 0) >= (alert.step or 0) + SNAPSHOT_STEPS
                or (alert.key, rank) in self._ended
                for rank, step in ranks_past
            )
            if done or complete:
                self.write(alert, run_dir, lines)
            else:
                keep.append((alert, run_dir, lines))
        self._pending = keep

    def write(self, alert: Alert, run_dir: Path, lines: list[schema.Message]) -> None:
        """Writes one snapshot into ``<run dir>/alerts/``, never through a symlink.

        Only into a run directory of this user, into an ``alerts`` directory that is a real
        directory of this user, and as a new file (``O_EXCL | O_NOFOLLOW``): a prepared run
        directory cannot make the viewer write elsewhere or overwrite anything.
        """
        name = f"{alert.type}-rank{alert.rank}-step{alert.step}.jsonl"
        lines = sorted(
            {(m.rank, m.seq): m for m in lines}.values(), key=lambda m: (m.step or 0, m.rank)
        )
        try:
            fd = _create_owned(run_dir, name)
        except FileExistsError:
            return  # written by an earlier viewer of the same run
        except OSError:
            self.errors += 1
            return
        try:
            with open(fd, "wb") as file:
                file.write(orjson.dumps(alert.to_record()) + b"\n")
                file.writelines(m.encode() for m in lines)
        except OSError:
            self.errors += 1
            return
        self.written.append(run_dir / "alerts" / name)


def _create_owned(run_dir: Path, name: str) -> int:
    """A new file ``run_dir/alerts/name`` (mode 0600), opened for writing, every step checked."""
    run_fd = owned_dir_fd(run_dir)
    try:
        try:
            os.mkdir("alerts", 0o700, dir_fd=run_fd)
        except FileExistsError:
            pass
        alerts_fd = owned_dir_fd("alerts", dir_fd=run_fd)
    finally:
        os.close(run_fd)
    try:
        return create_new(alerts_fd, name)
    finally:
        os.close(alerts_fd)


class Alerting:
    """The engine, ``--on-alert`` and the snapshots together: what headless and the app both run.

    ``feed`` and ``tick`` have the engine's signatures; ``runs`` is the run book's mapping of
    runs by key (objects with ``dir``), consulted for a run's directory when a snapshot starts.
    """

    def __init__(self, settings: AlertSettings, runs: Mapping[Any, Any]) -> None:
        self.engine = AlertEngine(settings)
        self.command = (
            AlertCommand(settings.on_alert, settings.on_alert_per_minute)
            if settings.on_alert
            else None
        )
        self.snapshots = Snapshots() if settings.snapshots and settings.enabled else None
        self._runs = runs
        self.failed: str | None = None  # the engine's error on metrics, once it raised one
        self.tick_failed: str | None = None  # its error judging crashes and stalls
        self._critical_notice = False  # a history worker lost: part of the history unjudged

    @property
    def critical(self) -> bool:
        """Whether any critical alert fired (the engine's, or a critical notice of ours)."""
        return self.engine.critical or self._critical_notice

    def feed(self, key: str, message: schema.Message) -> list[Alert]:
        """The alerts ``message`` raised, after starting their commands and snapshots."""
        return [alert for _, alert in self.feed_batch([(key, message)])]

    def feed_batch(self, batch: list[tuple[str, schema.Message]]) -> list[tuple[int, Alert]]:
        """``AlertEngine.feed_batch``, after starting the alerts' commands and snapshots."""
        if self.failed is not None:
            return []
        try:
            told = self.engine.feed_batch(batch)
        except Exception as exc:  # a fault of ours: told once, and the screen keeps moving
            return [(len(batch) - 1, self.broke(f"{type(exc).__name__}: {exc}"))]
        if self.snapshots is None:
            self._act([alert for _, alert in told])
            return told
        if not told:
            self.snapshots.observe_batch(batch)
            return told
        # Each alert acts once the snapshots have seen the messages up to the one that raised
        # it, not the whole batch: a long history's batch would push its 50 steps before out.
        pending = sorted(told, key=lambda pair: pair[0])
        for index, (key, message) in enumerate(batch):
            self.snapshots.observe(key, message)
            while pending and pending[0][0] == index:
                self._act([pending.pop(0)[1]])
        return told

    def told(self, alerts: list[Alert]) -> list[Alert]:
        """Alerts merged elsewhere (history workers' ranks, :class:`~.alerts.OnceByStep`),
        recorded and their commands started; their snapshots are :meth:`snapshot`'s."""
        for alert in self.engine.record(alerts):
            self._command(alert)
        return alerts

    def snapshot(
        self, alert: Alert, window: Callable[[str, int, int], list[schema.Message]]
    ) -> None:
        """Writes a critical alert's snapshot from ``window(run key, first step, last step)``
        (every rank's metrics messages in those steps, read again from a finished run's files)."""
        run = self._runs.get(alert.key)
        if self.snapshots is None or alert.step is None or run is None or run.dir is None:
            return
        lines = window(alert.key, alert.step - SNAPSHOT_STEPS, alert.step + SNAPSHOT_STEPS)
        self.snapshots.write(alert, run.dir, lines)

    def broke(self, error: str) -> Alert:
        """Alerts stop for good after an error in the engine (here or in a history worker): a
        fault of lmtop's, not of the run, so a warning; the charts and the output go on."""
        self.failed = error
        return self._failure(
            f"alerts on metrics stopped by an error in lmtop ({error[:200]}); charts go on"
        )

    def lost(self, why: str) -> Alert:
        """Alerts stop for good: a history worker was lost and part of the history went
        unjudged, as grave as what it may hide (a NaN): critical, so the exit status says so."""
        self.failed = why
        return self._failure(
            f"alerts on metrics stopped: {why}; the rest of the history was not judged", CRITICAL
        )

    def tick(self, episodes: list[rank_health.Episode]) -> list[Alert]:
        """Crashes, stalls and stragglers (see ``AlertEngine.tick``)."""
        if self.snapshots is not None:
            for episode in episodes:
                if isinstance(episode, rank_health.Crash):
                    self.snapshots.ended(episode.run, episode.rank)
        if self.tick_failed is not None:
            return []
        try:
            return self._act(self.engine.tick(episodes))
        except Exception as exc:
            self.tick_failed = f"{type(exc).__name__}: {exc}"
            text = (
                "crash, stall and straggler alerts stopped by an error in lmtop "
                f"({self.tick_failed[:200]}); charts go on"
            )
            return [self._failure(text)]

    def _failure(self, text: str, severity: str = WARNING) -> Alert:
        """Alerts stop after an error in the engine (a bug of lmtop's, not of the run) or an
        history worker lost: the charts and the tables go on, and the alert says so once, for
        every run (it has no run of its own), to ``--on-alert`` too. Crashes and stalls are
        judged apart from metrics: one stopping leaves the other."""
        alert = Alert(
            type="internal",
            severity=severity,
            run="lmtop",
            key="",
            rank=0,
            metric=None,
            step=None,
            value=None,
            baseline=None,
            message=text,
        )
        self._critical_notice = self._critical_notice or severity == CRITICAL
        return self._act([alert])[0]

    def diagnose(self, key: str) -> Diagnosis:
        """The run's learning-curve verdict (see ``AlertEngine.diagnose``)."""
        return self.engine.diagnose(key)

    def close(self) -> None:
        """Writes the snapshots still open and reports rate-limited commands."""
        if self.snapshots is not None:
            self.snapshots.close()
        if self.command is not None:
            self.command.close()

    def _command(self, alert: Alert) -> None:
        if self.command is not None:
            self.command(alert)

    def _act(self, alerts: list[Alert]) -> list[Alert]:
        for alert in alerts:
            self._command(alert)
            if self.snapshots is not None and alert.severity == CRITICAL:
                run = self._runs.get(alert.key)
                self.snapshots.alert(alert, run.dir if run is not None else None)
        return alerts
