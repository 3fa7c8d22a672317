"""``lmtop --headless``: every message of the selected runs as JSON lines on stdout, and alerts.

Alert records (``{"kind": "alert", "type", "severity", "run", "dir", "rank", "metric", "step",
"value", "baseline", "message", "t"}``) follow the message that raised them; a rank whose process
is gone without an end message is a critical ``crashed`` alert. The exit status is 2 when a
critical alert fired, 1 when ``--no-follow`` found nothing to read, 0 otherwise. A long finished
history is read, judged and encoded by worker processes (:mod:`.history_workers`), its ranks a
chunk at a time rather than a poll's share: the same messages in per-rank order, the same alerts.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, BinaryIO

import orjson
from lmtop.hooks import schema

from . import collector, history_workers
from .alert_actions import Alerting
from .alert_settings import AlertSettings
from .alerts import CRITICAL, Alert, OnceByStep
from .follow import Follower
from .history_workers import HistoryWorkers

WAITING_NOTICE_SECONDS = 2.0


def run(
    paths: Sequence[str],
    follow: bool = True,
    out: BinaryIO | None = None,
    settings: AlertSettings | None = None,
) -> int:
    """Prints each message once, in per-rank order, until the runs end; returns the exit status.

    The lines are the protocol's own (see ``lmtop.hooks.schema``), so ``jq`` reads them as is.
    A closed pipe (``lmtop --headless | head``) ends it quietly. ``settings`` (default: the
    documented defaults) configures the alerts; ``AlertSettings(enabled=False)`` turns them off.
    """
    stream = out if out is not None else sys.stdout.buffer
    settings = settings if settings is not None else AlertSettings()
    follower = Follower(
        paths, follow=follow, stall=settings.stall, straggler=settings.straggler, lines=True
    )
    alerting = Alerting(settings, follower.runs)
    started = time.monotonic()
    told_waiting = False
    workers: HistoryWorkers | None = None
    planned = follow  # whether workers were considered (a finished history's, once found)
    counts: dict[str, list[Any]] | None = None  # what the workers' reads found, per run

    try:
        while True:
            batch = follower.poll(0.25)
            collector.reading(follower.catching_up)
            if batch and not planned:
                planned = True
                workers = history_workers.start(follower, settings)
                if workers is not None:  # they read every rank from its start: this batch too
                    batch.clear()  # ~10 MB of messages, not kept while they print
                    _print_worked(workers, alerting, stream, settings.enabled)
                    counts = workers.counts
                    break
            chunks: list[bytes] = []
            # (index of the last message it stands for, alert)
            told = alerting.feed_batch(batch)
            after: dict[int, list[Alert]] = {}
            for index, alert in told:
                after.setdefault(index, []).append(alert)
            for index, (_, message) in enumerate(batch):
                chunks.append(message.encode())
                if index in after:
                    chunks.extend(_lines(after[index]))
            if follow:
                chunks.extend(_lines(alerting.tick(follower.book.health(time.monotonic()))))
            if chunks:
                stream.write(b"".join(chunks))
                stream.flush()
            if follower.done:
                break
            if (
                not told_waiting
                and not follower.runs
                and time.monotonic() - started > WAITING_NOTICE_SECONDS
            ):
                told_waiting = True
                where = ", ".join(paths) if paths else "this user's live runs"
                print(f"lmtop: waiting for a run in {where}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        # The reader left (| head). Point stdout at /dev/null so the interpreter's own flush at
        # exit does not complain a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        collector.reading(False)
        if workers is not None:
            workers.close()
        follower.close()
        alerting.close()
    _report(follower, counts)
    if not follow and not follower.runs:
        print(f"lmtop: {_nothing_in(paths)}", file=sys.stderr)
        return 1
    return 2 if alerting.critical else 0


def _nothing_in(paths: Sequence[str]) -> str:
    """Why there was nothing to print, path by path."""
    if not paths:
        return "no live runs of this user"
    reasons = []
    for text in paths:
        if not os.path.exists(text):
            reasons.append(f"{text}: no such file or directory")
        else:
            reasons.append(f"{text}: no lmtop run (rank-N.jsonl files) in it")
    return "; ".join(reasons)


def _lines(alerts: list[Alert]) -> list[bytes]:
    return [orjson.dumps(a.to_record(), option=orjson.OPT_APPEND_NEWLINE) for a in alerts]


def _print_worked(
    workers: HistoryWorkers, alerting: Alerting, stream: BinaryIO, judged: bool
) -> None:
    """Prints what the workers read, a chunk at a time, each alert once every rank of its run
    has gone past it; then the critical alerts' snapshots, from the files (those of the alerts
    told, however the output ended). ``judged``: alerts are on."""
    merge = OnceByStep(workers.ranks)
    critical: list[tuple[Alert, int]] = []  # each with the generation it was raised in

    def tell(alerts: list[tuple[Alert, int]]) -> list[bytes]:
        told = alerting.told([alert for alert, _ in alerts])
        critical.extend(pair for pair in alerts if pair[0].severity == CRITICAL)
        return _lines(told)

    try:
        for chunk in workers.chunks():
            parts = [chunk.data]
            if judged and alerting.failed is None:
                if chunk.broken is None and workers.failed is None:
                    for alert, generation in chunk.alerts:
                        merge.add(alert, generation)
                    if chunk.position is not None:
                        merge.advance(chunk.key, chunk.rank, chunk.position, chunk.lag)
                    parts.extend(tell(merge.take()))
                else:  # what was judged is told; the rest will not be
                    parts.extend(tell(merge.rest()))
                    if chunk.broken is not None:
                        parts.append(_lines([alerting.broke(chunk.broken)])[0])
                    else:
                        parts.append(_lines([alerting.lost(str(workers.failed))])[0])
            stream.write(b"".join(parts))
        if judged and alerting.failed is None:
            stream.write(b"".join(tell(merge.rest())))
        stream.flush()
    finally:
        for alert, generation in critical:
            alerting.snapshot(alert, functools.partial(_window, workers, generation))
    if workers.failed is not None and not judged:
        print(f"lmtop: {workers.failed}; its ranks were read here", file=sys.stderr)


def _window(
    workers: HistoryWorkers, generation: int, key: str, low: int, high: int
) -> list[schema.Message]:
    return workers.window(key, generation, low, high)


def _report(follower: Follower, counts: dict[str, list[Any]] | None = None) -> None:
    """Bad lines, gaps and another protocol's lines per run on stderr (``counts``: as workers
    read them, by run key: [bad lines, messages missing, the complaint])."""
    for run in follower.book.snapshot():
        notes = []
        if counts is None:
            bad, dropped, unsupported = run.bad_lines, run.dropped, follower.unsupported(run.key)
        else:
            bad, dropped, unsupported = counts.get(run.key, (0, 0, None))
        if bad:
            notes.append(f"{bad} bad lines skipped")
        if dropped:
            notes.append(f"{dropped} messages missing")
        if unsupported:
            notes.append(unsupported)
        if notes:
            print(f"lmtop: {run.name}: " + "; ".join(notes), file=sys.stderr)
    if follower.bad_live:
        print(f"lmtop: {follower.bad_live} bad live messages skipped", file=sys.stderr)
