"""``lmtop --headless``: every message of the selected runs as JSON lines on stdout, and alerts.

Alert records (``{"kind": "alert", "type", "severity", "run", "dir", "rank", "metric", "step",
"value", "baseline", "message", "t"}``) follow the message that raised them; a rank whose process
is gone without an end message is a critical ``crashed`` alert. The exit status is 2 when a
critical alert fired, 1 when ``--no-follow`` found nothing to read, 0 otherwise. A finished
history's alerts are computed by worker processes (:mod:`.alert_workers`), to the same output.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import BinaryIO

import orjson

from . import alert_workers, collector
from .alert_actions import Alerting
from .alert_settings import AlertSettings
from .alert_workers import AlertWorkers
from .alerts import Alert
from .follow import Follower

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
    workers: AlertWorkers | None = None
    planned = follow  # whether workers were considered (a finished history's, once found)

    try:
        while True:
            batch = follower.poll(0.25)
            collector.reading(follower.catching_up)
            if batch and not planned:
                planned = True
                workers = alert_workers.start(follower, settings)
            chunks: list[bytes] = []
            # (index of the last message it stands for, alert)
            told = alerting.feed_batch(batch, workers)
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
    _report(follower)
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


def _report(follower: Follower) -> None:
    for run in follower.book.snapshot():
        notes = []
        if run.bad_lines:
            notes.append(f"{run.bad_lines} bad lines skipped")
        if run.dropped:
            notes.append(f"{run.dropped} messages missing")
        unsupported = follower.unsupported(run.key)
        if unsupported:
            notes.append(unsupported)
        if notes:
            print(f"lmtop: {run.name}: " + "; ".join(notes), file=sys.stderr)
    if follower.bad_live:
        print(f"lmtop: {follower.bad_live} bad live messages skipped", file=sys.stderr)
