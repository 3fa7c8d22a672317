"""Reading whole rank files in worker processes: a long history decoded on every core.

An 8-rank history of 100,000 steps is 800,000 JSON lines; decoding them is pure Python, a few
microseconds a line, so one process reads them no faster than one core allows. A rank file is
independent of the others, so the follower hands each long one to a worker process, which
reads it as the follower would (same reader, run book and store; runs of the usual metrics
lines taken in bulk, :mod:`.bulk`, to the same end) and hands back what the columnar cache
holds — the rank's series as flat arrays and its state — as one ``.npz`` payload, not a
Python object per point. The follower takes it as it takes a cache, and
reads the file on from where the worker stopped. Workers are lent to the follower only while a
history is read. Those started as the viewer opens a long history with no cache, before it has
a thread, are forked, and start with what it imported; those started later are spawned (the
viewer then has threads and sockets, and a thread holding a lock at a fork would leave it held
in the child).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from . import cache

# A rank file at least this long is read by a worker (a shorter one takes a poll here, ~0.1 s).
WORKER_BYTES = 1 << 20


# Set in a worker when it starts: a file of the viewer's that is there while it wants reads
# (a path, not a semaphore: a worker still starting when the viewer quits must not fail), and
# the viewer's process id.
_wanted: str | None = None
_viewer = 0


def _started(wanted: str, viewer: int) -> None:
    global _wanted, _viewer
    _wanted, _viewer = wanted, viewer
    # A worker whose viewer died (kill -9) would wait on the pool's pipe forever: it holds
    # both of its ends. It goes once its parent is not the viewer any more.
    threading.Thread(target=_exit_when_orphaned, daemon=True, name="orphan-watch").start()


def _exit_when_orphaned() -> None:
    while os.getppid() == _viewer:
        time.sleep(1.0)
    os._exit(0)


def _stopped() -> bool:
    """Whether the viewer stopped the reads (its file is gone; a viewer that is gone itself
    is the orphan watch's: the worker exits)."""
    return _wanted is not None and not os.path.exists(_wanted)


def read_rank(run_dir: str, number: int) -> bytes | None:
    """Reads one rank's file to its end, in a worker; the cache's payload for it, or None when
    what was read cannot stand for the file (a line half written, a sequence in doubt) or the
    viewer said stop."""
    from .follow import Follower
    from .store import Store

    store = Store()
    follower = Follower([run_dir], follow=False, live=False)
    # A read makes ~3 objects a line (two dicts and a row) that live until the store has
    # them; the cyclic collector, run every few hundred of them, walked all those alive, so
    # it took a third of the read. Nothing a read makes is a cycle: it is off meanwhile.
    gc.disable()
    try:
        run, rank, file = follower.read_whole(Path(run_dir), number, store, _stopped)
    finally:
        gc.enable()
    if file is None or _stopped():
        return None
    state = cache.rank_state(run, rank, file)
    columns = store.rank_arrays(run.key, number) if state is not None else None
    if columns is None:
        return None
    meta, arrays = columns
    out = io.BytesIO()
    cache.write(
        out, {"format": cache.FORMAT, "offset": file.offset, "state": state, **meta}, arrays
    )
    return out.getvalue()


def _warm() -> None:
    """Imports, in a worker, what :func:`read_rank` needs (numpy: the bulk read's columns)."""
    import numpy  # noqa: F401

    from . import bulk, follow  # noqa: F401


def readers_ready() -> None:
    """Starts multiprocessing's resource tracker now, while ``sys.stderr`` is the process's
    own: under Textual it is a capture without a file descriptor, and spawning the tracker
    from there fails ("bad value(s) in fds_to_keep")."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


def forks_safely() -> bool:
    """Whether a worker process can be forked from this one now rather than spawned: on Linux,
    with this process running one thread (every thread counted, native ones too: numpy's
    OpenBLAS starts one), so that no lock is held by a thread the child would not have.
    Forked, a worker starts with the modules this process imported instead of importing them
    again (~0.25 s of CPU a worker)."""
    try:
        alone = len(os.listdir("/proc/self/task")) == 1
    except OSError:
        alone = False
    return sys.platform == "linux" and alone


class Readers:
    """A pool of worker processes reading rank files; results are taken as they come."""

    def __init__(self, workers: int, start: int = 0) -> None:
        """At most ``workers`` processes reading at once; ``start`` of them are started now,
        each importing what a read needs. Started now from a process with one thread, those
        are forked (see :func:`forks_safely`): a forked pool makes all its processes at once,
        so it has ``start`` of them, and reads beyond what they are busy with go to a spawned
        pool of the rest, made when first needed (a long file the first count missed: beside a
        cache that proves stale, or in a run that started since). Raises OSError
        when the processes, or the file that tells workers to go on, cannot be made."""
        self.forked = fork = start > 0 and forks_safely()  # else spawned
        self._workers = workers
        self._size = min(workers, start) if fork else workers  # the first pool's processes
        fd, self._wanted = tempfile.mkstemp(prefix="lmtop-readers-")  # private: mode 0600
        os.close(fd)
        # Removed when the pool is dropped unclosed too (a viewer that failed to start).
        self._remove = weakref.finalize(self, _remove, self._wanted)
        self._pool = self._executor(self._size, "fork" if fork else "spawn")
        self._more: ProcessPoolExecutor | None = None  # the spawned rest, beside a forked pool
        self._busy: list[Future[bytes | None]] = []  # reads handed to the forked pool
        if start > 0:
            try:
                # Forked, the pool makes every process at its first job: here, before a thread.
                for _ in range(min(start, self._size)):
                    self._pool.submit(_warm)
            except OSError:  # a process limit: the processes made so far go too
                for process in list(getattr(self._pool, "_processes", {}).values()):
                    process.terminate()
                    process.join(timeout=1.0)
                self.close()
                raise

    def _executor(self, size: int, method: str) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            size,
            mp_context=get_context(method),
            initializer=_started,
            initargs=(self._wanted, os.getpid()),
        )

    def submit(self, run_dir: Path, number: int) -> Future[bytes | None]:
        """Starts reading one rank's file."""
        pool = self._pool
        if self.forked:
            self._busy = [future for future in self._busy if not future.done()]
            if len(self._busy) >= self._size and self._workers > self._size:
                if self._more is None:
                    self._more = self._executor(self._workers - self._size, "spawn")
                pool = self._more
        future = pool.submit(read_rank, str(run_dir), number)
        if pool is self._pool and self.forked:
            self._busy.append(future)
        return future

    @staticmethod
    def result(future: Future[bytes | None]) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """A finished read as (offset, description, arrays), or None (then read it here)."""
        try:
            payload = future.result()
            if payload is None:
                return None
            head, arrays = cache.read(io.BytesIO(payload))
            return head["offset"], head, arrays
        except Exception:  # a worker that died or failed: the file is read in this process
            return None

    def close(self) -> None:
        """Stops the workers, reads under way included: quitting does not wait for them. A
        worker sees its file gone and gives up within one read budget (~10 ms); it is never
        killed, since one killed while it hands back a result leaves half a message in the
        pool's pipe, and the interpreter's exit then waits for the rest forever."""
        self._remove()
        for pool in (self._pool, self._more):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
