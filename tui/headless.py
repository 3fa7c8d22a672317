"""``lmtop --headless``: every message of the selected runs as JSON lines on stdout."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import BinaryIO

from .follow import Follower

WAITING_NOTICE_SECONDS = 2.0


def run(paths: Sequence[str], follow: bool = True, out: BinaryIO | None = None) -> int:
    """Prints each message once, in per-rank order, until the runs end; returns the exit status.

    The lines are the protocol's own (see ``lmtop.hooks.schema``), so ``jq`` reads them as is.
    A closed pipe (``lmtop --headless | head``) ends it quietly.
    """
    stream = out if out is not None else sys.stdout.buffer
    follower = Follower(paths, follow=follow)
    started = time.monotonic()
    told_waiting = False
    try:
        while True:
            batch = follower.poll(0.25)
            if batch:
                stream.write(b"".join(message.encode() for message in batch))
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
        follower.close()
    _report(follower)
    return 0


def _report(follower: Follower) -> None:
    for run in follower.runs.values():
        notes = []
        if run.bad_lines:
            notes.append(f"{run.bad_lines} bad lines skipped")
        if run.dropped:
            notes.append(f"{run.dropped} messages missing")
        for rank in run.ranks.values():
            if rank.file is not None and rank.file.unsupported:
                notes.append(rank.file.unsupported)
                break
        if notes:
            print(f"lmtop: {run.name}: " + "; ".join(notes), file=sys.stderr)
    if follower.bad_live:
        print(f"lmtop: {follower.bad_live} bad live messages skipped", file=sys.stderr)
