"""Alerts over a finished history, computed in worker processes (``lmtop --headless --no-follow``).

The alert engine costs several microseconds a message and keeps its state per rank, in order:
over an 8-rank history of 100,000 steps it is most of headless mode's time, on one core. Each
rank's alerts depend on that rank's messages alone, so workers can compute them, a group of
ranks each, while this process reads the files as before for the output. What stays here is
what needs every rank: the output in per-rank order, the merge of one event seen by several
ranks into one alert (``OnceAcrossRanks``, batch by batch as before), the snapshots and
``--on-alert``. So the output is the serial one, line for line.

A worker reads its ranks' files as the follower does (same reader, same run book) and feeds an
engine of its own; it sends, per chunk read, how far it read the rank's file and the alerts
its messages raised, keyed by their ``seq``. Before the engine here takes a batch,
:meth:`AlertWorkers.ready` waits until each worker has read its ranks' files at least as far
as the follower here has, and the engine takes those ranks' alerts by ``seq``.

Only where that gives the serial alerts (see :func:`start`): runs whose every rank file ends
with the rank's end message (a file that may still grow could be read further here than by
its worker), whose ranks started with the same config (the engine on one process lends a
run's config to all its ranks), and that are not also a Trainer's output directory. The two
reads end in other places (a worker reads 2 MB a time, the follower here less): what a file
gives does not depend on that (``Follower._take`` judges a line whose ``seq`` jumps ahead by
the line after it, in the next read if need be).
"""

from __future__ import annotations

import math
import os
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
from lmtop.hooks import schema

from . import collector, runfile
from .alert_settings import AlertSettings
from .alerts import Alert, AlertEngine, Known
from .follow import Follower, Keyed
from .runbook import Run

# A history at least this long (bytes of rank files not read yet after the first read) has its
# alerts computed by workers: below, starting them (~0.4 s of CPU each) costs more than they
# save (on 2 cores: slower at 11 MB, even at 23 MB, faster at 58 MB).
MIN_BYTES = 32 << 20
MAX_WORKERS = 8  # each holds ~35 MB; a box's cores are its training's data loaders' too
TAIL = 4096  # bytes read from a rank file's end to find its last line
_TOKENS = {schema.NAN: math.nan, schema.POS_INF: math.inf, schema.NEG_INF: -math.inf}


class WorkerFailed(RuntimeError):
    """A worker exited, or sent what it should not, before giving what was waited for."""


def cores() -> int:
    """The CPUs this process may run on (its affinity: a job's cgroup or taskset share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def start(follower: Follower, settings: AlertSettings) -> AlertWorkers | None:
    """Workers for the finished runs ``follower`` found (after its first poll), or None when
    they would not pay or would not give the serial alerts: alerts off, one core, a short
    history, a run not finished, ranks started with different configs (the engine on one
    process lends a run's config to all its ranks), a Trainer's own files beside the ranks'.
    Workers that cannot start (a process limit) leave the alerts to this process."""
    count = min(cores(), MAX_WORKERS)
    if not settings.enabled or count < 2 or follower.unread_bytes() < MIN_BYTES:
        return None
    ranks = [(run, number) for run in follower.runs.values() for number in sorted(run.ranks)]
    if not ranks or not all(_finished(run, number) for run, number in ranks):
        return None
    for run in follower.runs.values():
        configs = [_config(state.info) for state in run.ranks.values()]
        if any(config != configs[0] for config in configs) or follower.has_trainer(run.key):
            return None
    try:
        return AlertWorkers(follower, settings, ranks, min(count, len(ranks)))
    except OSError:
        return None


def _config(info: dict[str, Any] | None) -> Any:
    return info.get("config") if isinstance(info, dict) else None


def _finished(run: Run, number: int) -> bool:
    """Whether the rank's file ends with its end message (and so will not grow), its last line
    read as the follower reads (a regular file only, never waiting on a FIFO, TAIL bytes)."""
    line = runfile.last_line(run.dir / schema.rank_file(number), TAIL) if run.dir else None
    try:
        return line is not None and schema.decode(line).kind == schema.END
    except schema.BadMessage:
        return False


class AlertWorkers:
    """Worker processes computing the alerts of groups of ranks; see the module's docstring."""

    def __init__(
        self,
        follower: Follower,
        settings: AlertSettings,
        ranks: list[tuple[Run, int]],
        workers: int,
    ) -> None:
        self._follower = follower
        context = get_context("spawn")  # not forked: the caller may have threads
        groups: list[list[tuple[Run, int]]] = [ranks[i::workers] for i in range(workers)]
        self._workers: list[tuple[Any, Connection]] = []
        # (run key, rank) -> its worker's index, how far that worker read the rank's file
        self._owner: dict[tuple[str, int], int] = {}
        self._read: dict[tuple[str, int], int] = {}
        self._done = [False] * workers
        self._keys: list[dict[tuple[str, int], str]] = []  # per worker: its (dir, rank) -> key
        for index, group in enumerate(groups):
            jobs = [(str(run.dir), number) for run, number in group]
            ends: tuple[Connection, ...] = ()
            try:
                ends = receiver, sender = context.Pipe(duplex=False)
                process = context.Process(
                    target=_work, args=(jobs, settings, sender), daemon=True, name="lmtop-alerts"
                )
                process.start()
            except OSError:  # a process or file limit: none of them, then
                for end in ends:
                    end.close()
                self.close()
                raise
            sender.close()  # the worker's end: its exit closes the pipe
            self._workers.append((process, receiver))
            self._keys.append({(str(run.dir), number): run.key for run, number in group})
            for run, number in group:
                self._owner[(run.key, number)] = index
                self._read[(run.key, number)] = 0
        # The alerts the workers sent, until the engine here takes them.
        self.known = Known(frozenset(self._owner), {})

    def ready(self, batch: list[Keyed]) -> Known:
        """The alerts the workers computed, once each has read its ranks' files as far as the
        follower here has, for ``batch`` (what the follower last gave): waits for them.

        Raises:
            WorkerFailed: a worker exited or failed before reading as far.
        """
        offset, owner, done = self._follower.read_offset, self._owner, self._read
        for rank in {(key, message.rank) for key, message in batch}:
            worker = owner.get(rank)
            if worker is not None:
                wanted = offset(*rank)
                while done[rank] < wanted:
                    self._receive(worker)
        return self.known

    def _receive(self, worker: int) -> None:
        process, receiver = self._workers[worker]
        if self._done[worker]:
            raise WorkerFailed(f"an alert worker finished before the files' end ({process.name})")
        try:
            record = orjson.loads(receiver.recv_bytes())
        except (EOFError, OSError, orjson.JSONDecodeError) as exc:
            stopped = f"an alert worker stopped (exit code {process.exitcode}): {exc}"
            raise WorkerFailed(stopped) from None
        if record == "done":
            self._done[worker] = True
            return
        if type(record) is not dict or "error" in record:
            why = record.get("error") if type(record) is dict else record
            raise WorkerFailed(f"an alert worker failed: {why!r}")
        key = self._keys[worker][(record["dir"], record["rank"])]
        self._read[(key, record["rank"])] = record["offset"]
        for seq, fields in record["alerts"]:
            self.known.alerts.setdefault((key, record["rank"], seq), []).append(_alert(key, fields))

    def close(self) -> None:
        """Stops the workers (they may still be reading when the output stopped early)."""
        for process, receiver in self._workers:
            receiver.close()
            if process.is_alive():
                process.terminate()
        for process, _ in self._workers:  # all told first: a slow exit is not waited on twice
            process.join(timeout=5.0)


def _work(jobs: list[tuple[str, int]], settings: AlertSettings, sender: Connection) -> None:
    """A worker: reads its ranks' files a chunk at a time in turn, each into the engine."""
    collector.settle()
    try:
        follower = Follower([directory for directory, _ in jobs], follow=False, live=False)
        engine = AlertEngine(settings)
        reading = list(jobs)
        while reading:
            for job in list(reading):
                directory, number = job
                out: list[Keyed] = []
                more = follower.read_rank(Path(directory), number, out)
                alerts = [
                    (message.seq, _fields(alert))
                    for key, message in out
                    for alert in engine.raised(key, message)
                ]
                offset = follower.read_offset(str(Path(directory)), number)
                record = {"dir": directory, "rank": number, "offset": offset, "alerts": alerts}
                sender.send_bytes(orjson.dumps(record))
                if not more:
                    reading.remove(job)
        sender.send_bytes(orjson.dumps("done"))
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the viewer is gone, or stopped us
    except Exception as exc:  # told to the viewer, whose alerts stop with a note
        try:
            sender.send_bytes(orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        except OSError:
            pass


def _fields(alert: Alert) -> list[Any]:
    """An alert of one rank as JSON (its run key is the parent's to give)."""
    number = schema.finite_or_token
    return [
        alert.type, alert.severity, alert.run, alert.rank, alert.metric, alert.step,
        None if alert.value is None else number(float(alert.value)),
        None if alert.baseline is None else number(float(alert.baseline)),
        alert.message, alert.t,
    ]  # fmt: skip


def _alert(key: str, fields: list[Any]) -> Alert:
    type_, severity, run, rank, metric, step, value, baseline, message, t = fields
    return Alert(
        type=type_, severity=severity, run=run, key=key, rank=rank, metric=metric, step=step,
        value=_number(value), baseline=_number(baseline), message=message, t=t,
    )  # fmt: skip


def _number(value: float | str | None) -> float | None:
    """A value as ``_fields`` wrote it: a float, a non-finite one's token, or None."""
    if value is None or type(value) is float:
        return value
    return _TOKENS.get(value, math.nan) if type(value) is str else float(value)
