"""A finished history read, judged and encoded by worker processes (``lmtop --headless
--no-follow``); this process only merges what they send and prints it.

The alert engine costs several microseconds a message and reading a rank file a few more: over
an 8-rank history of 100,000 steps that is ~12 s of CPU on one core. Each rank's messages and
their alerts depend on that rank alone, so workers take them, a group of ranks each: a worker
reads its ranks' files a chunk at a time in turn (the same reader and run book as the follower
here), feeds each chunk to an engine of its own and sends the chunk's lines as headless mode
prints them, with the alerts they raised on their own rank. This process takes one chunk from
each worker in turn and prints it; what needs every rank stays here: one event seen by several
ranks is told once, naming them, once every rank of the run has gone past its step
(:class:`~.alerts.OnceByStep`), after every message that raised it; ``--on-alert``; the counts
of bad lines; and the critical alerts' snapshots, read from the files once the history is out.

The output holds every message once, in per-rank order, and the alerts the serial path gives
(tests compare both; :class:`~.alerts.OnceByStep` says where a merged one can name fewer
ranks), though not in the serial path's places: ranks arrive a chunk (512 KB) at
a time rather than a poll's share. Only where that holds (see :func:`start`): runs whose every
rank file ends with the rank's end message (it will not grow while it is read), whose ranks
started with the same config (the engine on one process lends a run's config to all its
ranks), and that are not also a Trainer's output directory. A worker that dies leaves its
ranks to this process, which prints the rest of them unjudged; the alerts stop with a critical
notice, so the exit status says the history was not judged whole (alerts off: a note).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import orjson
from lmtop.hooks import schema

from . import collector, runfile
from .alert_settings import AlertSettings
from .alerts import END, Alert, AlertEngine
from .follow import Follower, Keyed
from .readers import forks_safely
from .runbook import Run

# A history at least this long (bytes of rank files not read yet after the first read) is read
# by workers: below, starting them (~0.2 s of CPU each) costs more than they save. On 2 cores,
# 8 ranks, alerts on: 0.9-1.3 against 1.1-1.4 s at 14 MB, 1.7-1.9 against 2.6 s at 28 MB.
MIN_BYTES = 16 << 20
# The same with alerts off, where a worker only reads: no faster at 28 and 56 MB (0.7-1.4 s
# either way), faster at 290 MB (3.6-4.0 against 5.2-6.0 s).
MIN_BYTES_UNJUDGED = 64 << 20
MAX_WORKERS = 8  # each holds ~30 MB; a box's cores are its training's data loaders' too
# Bytes of a rank file a worker reads, judges and sends at a time: what it holds at once (a
# worker's peak RSS over 2 ranks of 36 MB: 39 MB at 2 MB, 28 MB at 512 KB, no slower) and how
# far apart the ranks' reads may drift (an alert waits for every rank).
CHUNK_BYTES = 512 << 10
AHEAD = 8  # chunks of a worker held here at most, while another's turn is waited for
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


def start(follower: Follower, settings: AlertSettings) -> HistoryWorkers | None:
    """Workers for the finished runs ``follower`` found (after its first poll), or None when
    they would not pay or would not give the serial output: one core, one rank, a short
    history, a run not finished, a Trainer's own files beside the ranks', or, alerts on, ranks
    started with different configs (the engine on one process lends a run's config to all).
    Workers that cannot start (a process limit) leave it all to this process."""
    count = min(cores(), MAX_WORKERS)
    least = MIN_BYTES if settings.enabled else MIN_BYTES_UNJUDGED
    if count < 2 or follower.unread_bytes() < least:
        return None
    ranks = [(run, number) for run in follower.runs.values() for number in sorted(run.ranks)]
    # One rank is one worker's: no faster than reading it here (1 x 1M steps: 15.0 against
    # 14.8 s), since a rank file is read in order by one process.
    if len(ranks) < 2 or not all(_finished(run, number) for run, number in ranks):
        return None
    for run in follower.runs.values():
        configs = [_config(state.info) for state in run.ranks.values()]
        mixed = settings.enabled and any(config != configs[0] for config in configs)
        if mixed or follower.has_trainer(run.key):
            return None
    try:
        return HistoryWorkers(follower, settings, ranks, min(count, len(ranks)))
    except OSError:
        return None


def _forks() -> bool:
    """Whether workers are forked (where that is safe: :func:`.readers.forks_safely`) rather
    than spawned. Forked, a worker starts without importing lmtop again (~0.25 s of CPU each;
    8 ranks x 100k steps on 2 cores: 5.97-6.18 s against 6.32-7.08 s spawned). ``--no-follow``
    runs one thread (no live sockets, so no ZeroMQ threads)."""
    return forks_safely()


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


@dataclass(slots=True)
class Chunk:
    """What a worker read of one rank at a time: its messages' lines, as headless mode prints
    them, and the alerts they raised on that rank alone."""

    key: str  # the run's key here
    rank: int
    data: bytes
    alerts: list[tuple[Alert, int]]  # each with the rank's generation it was raised in
    # How far the rank was read, (generation, highest step of it) for OnceByStep (END: read to
    # its end; None: nothing judged in this chunk), and the largest step back it has shown
    position: tuple[float, float] | None
    lag: float = 0.0
    broken: str | None = None  # the worker's alert engine failed here (an error of lmtop's)


class HistoryWorkers:
    """Worker processes reading, judging and encoding groups of ranks; see the module's
    docstring. :meth:`chunks` gives what they send, one chunk of each worker in turn."""

    def __init__(
        self,
        follower: Follower,
        settings: AlertSettings,
        ranks: list[tuple[Run, int]],
        workers: int,
    ) -> None:
        forks = _forks()
        context = get_context("fork") if forks else get_context("spawn")
        self._chunk = CHUNK_BYTES
        self._groups: list[list[tuple[Run, int]]] = [ranks[i::workers] for i in range(workers)]
        self._workers: list[tuple[Any, Connection]] = []
        for group in self._groups:
            jobs = [(str(run.dir), number) for run, number in group]
            ends: tuple[Connection, ...] = ()
            try:
                ends = receiver, sender = context.Pipe(duplex=False)
                # A forked worker holds this pipe's reading end and the earlier workers': it
                # lets them go first, or a viewer killed would leave it writing for ever.
                held = [end.fileno() for _, end in self._workers] + [receiver.fileno()]
                process = context.Process(
                    target=_work,
                    args=(jobs, settings, self._chunk, sender, held if forks else []),
                    daemon=True,
                    name="lmtop-history",
                )
                process.start()
            except OSError:  # a process or file limit: none of them, then
                for end in ends:
                    end.close()
                self.close()
                raise
            sender.close()  # the worker's end: its exit closes the pipe
            self._workers.append((process, receiver))
        self.ranks: dict[str, list[int]] = {}  # run key -> its ranks
        self._dirs: dict[str, Path] = {}
        self._key_of: dict[str, str] = {}  # a run's directory as workers name it -> its key
        for run, number in ranks:
            self.ranks.setdefault(run.key, []).append(number)
            self._dirs[run.key] = Path(str(run.dir))
            self._key_of[str(run.dir)] = run.key
        # Per (run key, rank): messages given out, how far its file was read (the end of the
        # last line given), and each chunk's (start, end, lowest step, highest step, first
        # generation, last generation), for windows.
        self.given: dict[tuple[str, int], int] = {}
        self.read: dict[tuple[str, int], int] = {}
        self._index: dict[tuple[str, int], list[tuple[int, ...]]] = {}
        # run key -> [bad lines, messages missing, the first "unsupported version" complaint]
        self.counts: dict[str, list[Any]] = {}
        self.failed: str | None = None  # why a worker was lost (its ranks were read here)

    def chunks(self) -> Iterator[Chunk]:
        """Each worker's next chunk in turn, until every rank is read to its end. A worker
        lost (killed, failed) has the rest of its ranks read here, unjudged (``failed``).

        Chunks are taken from whichever worker has one ready, up to AHEAD a worker, and given
        in turn: a worker whose chunk is slower to come does not hold the others still."""
        queues: list[deque[Chunk | WorkerFailed | None]] = [deque() for _ in self._workers]
        taking = set(range(len(self._workers)))  # workers still sending
        turns = list(range(len(self._workers)))
        while turns:
            for worker in list(turns):
                while not queues[worker]:
                    self._gather(queues, taking)
                item = queues[worker].popleft()
                if isinstance(item, WorkerFailed):
                    self.failed = self.failed or str(item)
                    turns.remove(worker)
                    yield from self._read_here(worker)
                elif item is None:
                    turns.remove(worker)
                else:
                    yield item

    def _gather(self, queues: list[deque[Chunk | WorkerFailed | None]], taking: set[int]) -> None:
        """Takes a chunk from each worker that has one ready (waiting for one), up to AHEAD
        waiting a worker; the end of a worker (its last item: None, or why it failed)."""
        ends: dict[Any, int] = {  # wait() gives back the connections it was given
            self._workers[worker][1]: worker for worker in taking if len(queues[worker]) < AHEAD
        }
        for end in wait(list(ends)):
            worker = ends[end]
            try:
                item: Chunk | WorkerFailed | None = self._receive(worker)
            except WorkerFailed as exc:
                item = exc
            queues[worker].append(item)
            if item is None or isinstance(item, WorkerFailed):
                taking.discard(worker)

    def _receive(self, worker: int) -> Chunk | None:
        """The worker's next chunk; None once it is done."""
        process, receiver = self._workers[worker]
        try:
            record = orjson.loads(receiver.recv_bytes())
            data = receiver.recv_bytes() if type(record) is dict and "data" in record else b""
        except (EOFError, OSError, orjson.JSONDecodeError) as exc:
            process.join(timeout=1.0)  # gone, mostly: its exit code says how
            said = f": {exc}" if str(exc) else ""
            stopped = f"a history worker stopped (exit code {process.exitcode}){said}"
            raise WorkerFailed(stopped) from None
        if type(record) is not dict or "error" in record:
            why = record.get("error") if type(record) is dict else record
            raise WorkerFailed(f"a history worker failed: {why!r}")
        if "done" in record:
            for directory, (bad, dropped, unsupported) in record["done"].items():
                self._count(directory, bad, dropped, unsupported)
            return None
        key, rank = self._key_of[record["dir"]], record["rank"]
        self._given(key, rank, record["n"], record["start"], record["end"], record["steps"])
        alerts = [(_alert(key, fields), generation) for *fields, generation in record["alerts"]]
        at, lag = record["at"], 0.0
        if not record["more"]:
            position: tuple[float, float] | None = END
        elif at is None:
            position = None
        else:
            generation, top, lag = at
            position = (generation, -math.inf if top is None else top)
        return Chunk(key, rank, data, alerts, position, lag, record["broken"])

    def _given(self, key: str, rank: int, count: int, start: int, end: int, steps: Any) -> None:
        """Notes a chunk given out: its messages, where its lines lie in the rank's file, and
        ``steps``: the lowest and highest steps they hold and the generations they span, if
        any step (for :meth:`window`)."""
        self.given[(key, rank)] = self.given.get((key, rank), 0) + count
        self.read[(key, rank)] = end
        if steps:
            self._index.setdefault((key, rank), []).append((start, end, *steps))

    def _count(self, directory: str, bad: int, dropped: int, unsupported: str | None) -> None:
        key = self._key_of.get(directory)
        if key is None:  # a run no worker was given (none: runs are read by directory)
            return
        counts = self.counts.setdefault(key, [0, 0, None])
        counts[0] += bad
        counts[1] += dropped
        counts[2] = counts[2] or unsupported

    def _read_here(self, worker: int) -> Iterator[Chunk]:
        """The rest of a lost worker's ranks, read here as it read them: every message it did
        not give, in order, unjudged."""
        group = self._groups[worker]
        follower = Follower(
            sorted({str(run.dir) for run, _ in group}), follow=False, live=False, lines=True
        )
        try:
            for run, number in group:
                directory = str(run.dir)
                skip, more, generation = self.given.get((run.key, number), 0), True, 0
                while more:
                    out: list[Keyed] = []
                    start = follower.read_offset(directory, number)
                    more = follower.read_rank(Path(directory), number, out, self._chunk)
                    taken = out[skip:]
                    skip = max(0, skip - len(out))
                    end = follower.read_offset(directory, number)
                    span, went = _span(out), generation
                    generation += _starts(out)
                    steps = span and (*span, went, generation)
                    self._given(run.key, number, len(taken), start, end, steps)
                    data = b"".join([message.encode() for _, message in taken])
                    yield Chunk(run.key, number, data, [], None if more else END)
            for summary in follower.book.snapshot():
                unsupported = follower.unsupported(summary.key)
                self._count(summary.key, summary.bad_lines, summary.dropped, unsupported)
        finally:
            follower.close()

    def window(self, key: str, generation: int, low: int, high: int) -> list[schema.Message]:
        """The metrics messages of every rank of run ``key`` in ``generation`` (its ranks'
        goes: see OnceByStep) with a step from ``low`` to ``high``, read again from its files:
        the chunks whose steps reach into that span."""
        out = []
        for rank in self.ranks.get(key, ()):
            path = self._dirs[key] / schema.rank_file(rank)
            for start, end, first, last, went, gone in self._index.get((key, rank), ()):
                if last < low or first > high or not went <= generation <= gone:
                    continue
                at = went
                for line in (runfile.read_range(path, start, end) or b"").split(b"\n"):
                    try:
                        message = schema.decode(line)
                    except schema.BadMessage:
                        continue
                    step = message.step
                    if message.kind == schema.START:
                        at += 1
                    elif (
                        message.kind == schema.METRICS
                        and at == generation
                        and message.rank == rank
                        and step is not None
                        and low <= step <= high
                    ):
                        out.append(message)
        return out

    def close(self) -> None:
        """Stops the workers (they may still be reading when the output stopped early)."""
        for process, receiver in self._workers:
            receiver.close()
            if process.is_alive():
                process.terminate()
        for process, _ in self._workers:  # all told first: a slow exit is not waited on twice
            process.join(timeout=5.0)


def _work(
    jobs: list[tuple[str, int]],
    settings: AlertSettings,
    chunk: int,
    sender: Connection,
    held: list[int],
) -> None:
    """A worker: reads its ranks' files ``chunk`` bytes at a time in turn, each into the engine,
    and sends each chunk's lines and alerts; then each run's counts of bad lines and gaps.
    ``held``: the pipe ends a forked worker inherited and must let go."""
    _let_go(held, sender.fileno())
    collector.settle()
    try:
        follower = Follower(
            sorted({directory for directory, _ in jobs}), follow=False, live=False, lines=True
        )
        engine = AlertEngine(settings)
        raised, start_kind, metrics = engine.raised, schema.START, schema.METRICS
        judging = settings.enabled
        # Per rank, for OnceByStep: start messages seen (its generation), the highest step of
        # the generation and the largest step back it has shown (an evaluation logged at an
        # earlier step than the training step before it).
        places = {job: [0, -math.inf, 0] for job in jobs}
        reading = list(jobs)
        while reading:
            for job in list(reading):
                directory, number = job
                start = follower.read_offset(directory, number)
                out: list[Keyed] = []
                more = follower.read_rank(Path(directory), number, out, chunk)
                alerts: list[list[Any]] = []
                broken, at = None, None
                place = places[job]
                went = place[0]  # the generation the chunk starts in
                if judging:
                    generation, top, lag = place
                    try:
                        for key, message in out:
                            kind = message.kind
                            if kind == metrics:
                                step = message.step
                                if step is None:  # the engine counts the rank's messages
                                    step = engine.points(directory, number)
                                if step > top:
                                    top = step
                                elif top - step > lag:
                                    lag = top - step
                            elif kind == start_kind:
                                generation, top = generation + 1, -math.inf
                            found = raised(key, message)
                            if found:
                                alerts.extend([*_fields(a), generation] for a in found)
                    except Exception as exc:  # a fault of ours: told once; the output goes on
                        broken, judging = f"{type(exc).__name__}: {exc}", False
                        generation = went + _starts(out)
                    place[:] = generation, top, lag
                    at = [generation, None if top == -math.inf else top, lag]
                else:
                    place[0] += _starts(out)
                span = _span(out)
                record = {
                    "dir": directory,
                    "rank": number,
                    "n": len(out),
                    "start": start,
                    "end": follower.read_offset(directory, number),
                    "steps": span and [*span, went, place[0]],
                    "at": at,
                    "more": more,
                    "alerts": alerts,
                    "broken": broken,
                    "data": True,
                }
                sender.send_bytes(orjson.dumps(record))
                sender.send_bytes(b"".join([message.encode() for _, message in out]))
                if not more:
                    reading.remove(job)
        counts = {
            s.key: [s.bad_lines, s.dropped, follower.unsupported(s.key)]
            for s in follower.book.snapshot()
        }
        sender.send_bytes(orjson.dumps({"done": counts}))
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the viewer is gone, or stopped us
    except Exception as exc:  # told to the viewer, which reads the rest and stops the alerts
        try:
            sender.send_bytes(orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        except OSError:
            pass


def _let_go(held: list[int], own: int) -> None:
    """A worker's start: the other workers' pipe ends it inherited and its standard output
    point at /dev/null. A worker never prints, and holding either would keep a pipeline open
    (``lmtop --headless --no-follow | jq``) after the viewer is killed, the worker writing for
    ever. ``own``: its own pipe's end, left alone (fd 1 where the viewer had closed its stdout)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (*held, 1):
            if fd == own:
                continue
            try:
                os.dup2(devnull, fd)  # not closed: the number stays this process's own
            except OSError:
                pass
    finally:
        os.close(devnull)


def _starts(out: list[Keyed]) -> int:
    """How many start messages a chunk holds (a rank's new goes)."""
    start = schema.START
    return sum(message.kind == start for _, message in out)


def _span(out: list[Keyed]) -> tuple[int, int] | None:
    """The lowest and the highest step of a chunk's metrics messages; None when none has one."""
    metrics = schema.METRICS
    steps = [m.step for _, m in out if m.kind == metrics and m.step is not None]
    return (min(steps), max(steps)) if steps else None


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
