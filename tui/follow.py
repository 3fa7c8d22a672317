"""Following runs: history from the run files, live messages over ZeroMQ, merged exactly once.

This is the zguide's Clone pattern with the run file as the snapshot. For each rank the follower
subscribes to the rank's socket first, then reads its file, then applies live messages whose
``seq`` is newer than the last one applied. The hook writes a message to the file before it sends
it live, so a live message that skips ahead means the file already holds the ones in between:
they are read from there, never invented. Files are also read on a timer, which picks up ranks
without a live path and anything the live path dropped.

Each rank's socket is its own SUB socket, so a live frame is routed by the endpoint it came
from to exactly one (run, rank): two runs that share a name never mix. The follower owns
discovery, the files and the sockets; what is known of runs and ranks lives in its
:class:`~.runbook.RunBook`. Nothing here imports Textual.
"""

from __future__ import annotations

import os
import socket
import time
from array import array
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import FIRST_COMPLETED, Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtop.hooks import registry, schema

from . import bulk, cache, discovery, tensorboard_events, trainer_state
from .alert_settings import StallSettings, StragglerSettings
from .readers import WORKER_BYTES, Readers, readers_ready
from .runbook import RankState, Run, RunBook
from .runfile import RankFile
from .tensorboard_events import TensorBoardRun
from .trainer_state import TrainerRun

if TYPE_CHECKING:
    from .replay import Replay
    from .store import Store

SCAN_SECONDS = 0.25  # how often files are read and processes checked
# A rank that said nothing is read (and its process checked) less and less often, up to this:
# following 10,000 idle ranks must not cost a core. Any message of it resets the pace.
IDLE_SECONDS = 2.0
FOLDER_SCAN_SECONDS = 1.0  # how often folders and the registry are searched for new runs
# A rank whose process cannot be checked (another host, or no pid known), silent this long, is
# given up as "unknown": an evaluation or a checkpoint can be silent for minutes.
REMOTE_SILENT_SECONDS = 300.0
# Bytes of run files read per poll, over all ranks together (at least MIN_READ per rank): what
# one poll returns, and so what a viewer holds at once, does not grow with the history, nor with
# the ranks up to READ_BUDGET / MIN_READ = 128 of them (then by MIN_READ, ~40 lines, a rank).
READ_BUDGET = 2 << 20
MIN_READ = 16 << 10
LIVE_DRAIN_FRAMES = 2000
# Runs of plain metrics lines a poll reads from files are taken in bulk (Follower._take_lines);
# off, every line a poll reads takes the general path (the tests' reference; a worker's whole
# read, read_whole, is always in bulk, and tests compare it with polls made with this off).
PLAIN_RUNS = True
LIVE_FILE_SECONDS = 1.0  # how often the file of a rank heard live is read (see Follower._apply)
# Live frames arriving within this of the first are one poll (one store update per series, one
# snapshot, one screen message): 16 ranks at 40 steps/s cost the viewer 25-28 % of a core at
# 0.05 s, 20-21 % at 0.2 s. Charts are redrawn every 0.5 s at best, so nothing shows later.
LIVE_DRAIN_SECONDS = 0.2

HOST = socket.gethostname()

Keyed = tuple[str, schema.Message]  # (the run's key, one of its messages)
# A rank taken from its cache: (run key, rank, description, arrays) for Store.adopt.
Restored = tuple[str, int, dict[str, Any], dict[str, array]]
# A rank's cache is written again once its file grew by this much (a history read, mostly).
CACHE_BYTES = 1 << 20


class Follower:
    """Discovers runs and yields each of their messages once, in per-rank order.

    Args:
        paths: run directories, rank files or folders of runs; none means this user's live runs.
        follow: keep reading as runs grow; without it, read what is there and stop.
        live: subscribe to the ranks' ZeroMQ sockets (files alone otherwise).
        stall: when a rank counts as silent; straggler: when it counts as a straggler.
    """

    def __init__(
        self,
        paths: Sequence[str] = (),
        follow: bool = True,
        live: bool = True,
        stall: StallSettings | None = None,
        straggler: StragglerSettings | None = None,
        cache: bool = False,
        readers: int = 0,
        lines: bool = False,
    ) -> None:
        self.follow = follow
        # Messages of plain lines keep their line where it stands for them, so that
        # Message.encode gives it as it is (headless mode prints every message): bulk.PlainRun.
        self.lines = lines
        self.paths = list(paths)  # as the person wrote them, for messages
        self.book = RunBook(stall, straggler)
        self._use_registry = not paths
        run_dirs, folders = discovery.resolve(list(paths))
        # Trainer output directories (trainer_state.json) and TensorBoard event directories:
        # found among the paths and folders.
        self._trainers: dict[str, TrainerRun | TensorBoardRun] = {}
        self._run_dirs = [Path(os.path.realpath(p)) for p in run_dirs]
        self._folders = [Path(os.path.realpath(p)) for p in folders]
        self._files: dict[tuple[str, int], RankFile] = {}
        self._idle: dict[tuple[str, int], tuple[float, float]] = {}  # -> (next read, interval)
        self._listed: dict[str, int] = {}  # run key -> its folder's mtime when last listed
        self._last_scan = -1e9
        self._last_folder_scan = -1e9
        self._backlog = False
        self._limit = READ_BUDGET  # bytes per rank file per read (see READ_BUDGET)
        self._scanned_once = False
        self._live = _LiveSockets() if follow and live else None
        self._live_behind = False  # the last drain left frames waiting
        self.bad_live = 0  # live frames that were not messages (they name no run to blame)
        # The columnar cache (cache.py): ranks taken from it, for the store, and the offset
        # each rank's cache covers (0: looked for, none).
        self._cache = cache
        self._restored: list[Restored] = []
        self._cached_at: dict[tuple[str, int], int] = {}
        # Worker processes reading long rank files (readers.py): started here for a history
        # with no cache (they start while the screen is set up), else when first needed.
        self._workers = readers
        self._readers: Readers | None = None
        if readers > 0:
            readers_ready()
            uncached = self._uncached_history()
            if uncached:  # they start (forked, before the screen has a thread) as it is set up
                self._readers = self._pool(uncached)
        self._reading: dict[tuple[str, int], Future[bytes | None]] = {}

    @property
    def runs(self) -> dict[str, Run]:
        """Every run by key (owned by the polling thread; other threads take snapshots)."""
        return self.book.runs

    # -- the loop -------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.1) -> list[Keyed]:
        """Returns the messages that became known since the last call, with their run's key,
        waiting at most ``timeout`` seconds for live ones when there is nothing to read."""
        out: list[Keyed] = []
        now = time.monotonic()
        restored = len(self._restored)
        if self._backlog or now - self._last_scan >= SCAN_SECONDS:
            self._scan(out, now)
        # Ranks taken whole (a cache, a worker's read) go on with this poll, not after a wait.
        taken = bool(out) or len(self._restored) > restored
        if not taken and self._reading:  # only workers' reads wait: for them, not in a spin
            futures.wait(self._reading.values(), min(timeout, SCAN_SECONDS), FIRST_COMPLETED)
        if self._live is not None:
            behind = taken or self._backlog or self._live_behind
            wait = 0.0 if behind else min(timeout, SCAN_SECONDS)
            self._drain_live(out, wait)
        elif not taken and not self._backlog and timeout > 0:
            time.sleep(min(timeout, SCAN_SECONDS))
        return out

    @property
    def catching_up(self) -> bool:
        """Whether files hold more than the last poll returned (a long history being read)."""
        return bool(self._backlog)

    @property
    def done(self) -> bool:
        """Whether nothing more will come: every run ended, or one pass was read without follow."""
        if self._backlog or not self._scanned_once:
            return False
        if not self.follow:
            return True
        return self.book.done(time.monotonic())

    # -- the columnar cache ---------------------------------------------------------------------

    def _uncached_history(self) -> int:
        """How many rank files of the run directories named on the command line, found in the
        folders named there (``lmtop ./lmtop_runs``) or, with none named, of this user's live
        runs (``lmtop``), are long enough for a worker and have no cache beside them (a first
        open of a long history): where the first scan will look. Counted up to the pool's size,
        the most readers it starts."""
        found = [d for folder in self._folders for d in discovery.run_dirs(folder)]
        if self._use_registry:
            try:
                found += [entry.get("dir") for entry in discovery.live_runs()]
            except Exception:  # an entry the first scan will complain of, not the count
                pass
        count = 0
        for run_dir in dict.fromkeys(map(_real_dir, [*self._run_dirs, *found])):
            if run_dir is None:
                continue
            for number in discovery.ranks(run_dir):
                try:
                    long = os.stat(discovery.rank_file(run_dir, number)).st_size >= WORKER_BYTES
                except OSError:
                    continue
                count += long and not (run_dir / cache.cache_name(number)).exists()
                if count >= self._workers:  # as many as the pool can have
                    return count
        return count

    def _pool(self, start: int = 0) -> Readers | None:
        """Worker processes, ``start`` of them started now; None (reads in this process) where
        they cannot be had."""
        try:
            return Readers(self._workers, start)
        except OSError:  # no temporary directory to write in
            self._workers = 0
            return None

    def _restore(self, run: Run, rank: RankState, file: RankFile, run_dir: Path) -> bool:
        """Starts a rank from its cache, if it has a valid one (looked for once), else hands a
        long file to a worker process; True when a worker reads it."""
        key = (run.key, rank.rank)
        if key in self._cached_at:
            return False
        self._cached_at[key] = 0
        found = cache.load(run_dir, rank.rank)
        if found is not None:
            self._adopt(run, rank, file, found)
            self._cached_at[key] = found[0]  # what the cache file covers
            return False
        if self._workers <= 0:
            return False
        try:
            if os.stat(file.path).st_size < WORKER_BYTES:
                return False
        except OSError:
            return False
        if self._readers is None:
            self._readers = self._pool()
            if self._readers is None:
                return False
        self._reading[key] = self._readers.submit(run_dir, rank.rank)
        return True

    def _adopt(
        self, run: Run, rank: RankState, file: RankFile, found: tuple[int, dict[str, Any], Any]
    ) -> None:
        """Takes a rank's state and series read elsewhere (a cache, a worker) up to an offset."""
        _, head, arrays = found
        cache.restore_rank(run, rank, file, head["state"])
        self._restored.append((run.key, rank.rank, head, arrays))

    def take_restored(self) -> list[Restored]:
        """The ranks started from their cache (or a worker's read) since the last call, for
        the store to adopt before the messages that follow them."""
        restored, self._restored = self._restored, []
        return restored

    def save_caches(self, store: Store) -> int:
        """Writes the cache of every rank whose file grew by more than CACHE_BYTES since its
        cache was written (or found); returns how many were written."""
        written = 0
        for run in self.runs.values():
            for rank in run.ranks.values():
                key = (run.key, rank.rank)
                file = self._files.get(key)
                if run.dir is None or file is None:
                    continue
                if file.offset - self._cached_at.get(key, 0) <= CACHE_BYTES:
                    continue
                state = cache.rank_state(run, rank, file)
                columns = store.rank_arrays(run.key, rank.rank) if state is not None else None
                if columns is None:
                    continue
                meta, arrays = columns
                if cache.save(run.dir, rank.rank, file.offset, {"state": state, **meta}, arrays):
                    written += 1
                self._cached_at[key] = file.offset  # not tried again until it grows as much
        return written

    # -- reading the history again (alerts over it come after its first frame) ----------------

    def unread_bytes(self) -> int:
        """Bytes of run files known but not read yet (as of each file's last read; a rank a
        worker reads counts whole)."""
        return sum(max(0, file.size - file.offset) for file in self._files.values())

    def has_trainer(self, key: str) -> bool:
        """Whether run ``key``'s directory is also a Trainer's (its state file is read too)."""
        return key in self._trainers

    def read_offset(self, key: str, rank: int) -> int:
        """How far the rank's file was given out as lines, in bytes: the end of the last
        complete line read (0 before the first)."""
        file = self._files.get((key, rank))
        return file.lines_end if file is not None else 0

    def read_rank(
        self, run_dir: Path, number: int, out: list[Keyed], limit: int = READ_BUDGET
    ) -> bool:
        """Applies the next chunk (``limit`` bytes) of one rank's file, as a poll reads it, into
        ``out``; True while more waits (a history worker's read, :mod:`.history_workers`)."""
        run = self.runs.get(str(run_dir)) or self._add_run_dir(run_dir)
        return self._read(run, self.book.rank(run, number), out, limit)

    def replayable(self, key: str) -> bool:
        """Whether the messages of run ``key`` can be read again from files."""
        run = self.runs.get(key)
        return run is not None and (run.dir is not None or key in self._trainers)

    def positions(self) -> dict[tuple[str, int], int]:
        """The seq of the last message applied, per (run key, rank) of every replayable run."""
        return {
            (run.key, rank.rank): rank.applied
            for run in self.runs.values()
            if self.replayable(run.key)
            for rank in run.ranks.values()
        }

    def replay(self, floor: dict[tuple[str, int], int], cut: dict[tuple[str, int], int]) -> Replay:
        """The messages applied with ``floor < seq <= cut``, per rank, read again from the start
        of the files by a reader of their own (files only, no sockets, this thread)."""
        from .replay import Replay

        dirs = [str(run.dir) for run in self.runs.values() if run.dir is not None]
        reader = Follower(dirs, follow=False, live=False, stall=self.book.stall)
        reader._trainers = {key: type(t)(t.dir) for key, t in self._trainers.items()}
        return Replay(reader, floor, cut)

    def read_whole(
        self, run_dir: Path, number: int, store: Store, stop: Callable[[], bool] | None = None
    ) -> tuple[Run, RankState, RankFile | None]:
        """Reads one rank's file to its end into ``store`` (what a worker process does), or
        until ``stop()`` says so."""
        run = self._add_run_dir(run_dir)
        rank = self.book.rank(run, number)
        file = self._file(run, rank)
        if file is None:
            return run, rank, None
        pending: list[Keyed] = []  # applied by the general path, for the store

        more = True

        def take(messages: list[schema.Message]) -> None:
            self._take(run, rank, messages, pending, more)

        def take_run(plain: bulk.PlainRun) -> None:
            store.add(pending)  # the store takes each rank's points in file order
            pending.clear()
            plain.to_store(run.key, rank.rank, store)

        while more and not (stop is not None and stop()):
            lines, more = file.read_lines(self._limit)
            bulk.read_chunk(run, rank, lines, file.decode_lines, take, take_run)
            if not more and rank.held is not None:
                self._take(run, rank, [], pending)  # the file's last line: nothing after it
            store.add(pending)
            pending.clear()
            rank.bad_lines = file.bad_lines
        return run, rank, file

    def close(self) -> None:
        """Closes the live sockets; returns at once (LINGER 0)."""
        if self._live is not None:
            self._live.close()
            self._live = None
        if self._readers is not None:
            self._readers.close()
            self._readers = None

    # -- discovery and files --------------------------------------------------------------------

    def _scan(self, out: list[Keyed], now: float) -> None:
        self._last_scan = now
        # New runs and ranks are looked for once a second: the registry (its entries read and
        # their processes checked, 1.4 ms with 16 live ranks) as the folders.
        looking = now - self._last_folder_scan >= FOLDER_SCAN_SECONDS or not self._scanned_once
        if looking and (self._use_registry or (self.follow and self._live is not None)):
            self._discover_registry()
        if looking:
            self._last_folder_scan = now
            for run_dir in self._run_dirs:
                self._add_run_dir(run_dir)
            for folder in self._folders:
                for run_dir in discovery.run_dirs(folder):
                    self._add_run_dir(Path(os.path.realpath(run_dir)))
                trainer_dirs = trainer_state.trainer_dirs(folder)
                for trainer_dir in trainer_dirs:
                    self._trainers.setdefault(str(trainer_dir), TrainerRun(trainer_dir))
                event_dirs = tensorboard_events.event_dirs(folder)
                # TensorBoard's reader is imported (~0.3 s) only once event files are found.
                if event_dirs and tensorboard_events.available():
                    # A Trainer's own event files (output/runs/...) repeat its state file.
                    inside = tuple(f"{d}{os.sep}" for d in trainer_dirs)
                    for event_dir in event_dirs:
                        if not f"{event_dir}{os.sep}".startswith(inside):
                            self._trainers.setdefault(str(event_dir), TensorBoardRun(event_dir))
        for trainer in self._trainers.values():
            self._read_trainer(trainer, out)
            for run in list(self.runs.values()):  # ranks that came and went between scans
                if run.dir is not None and run.dir not in self._run_dirs:
                    self._add_run_dir(run.dir)
        backlog = False  # set once at the end: the app's thread reads it meanwhile
        reading = sum(1 for run in self.runs.values() for r in run.ranks.values() if not r.done)
        self._limit = max(MIN_READ, READ_BUDGET // max(1, reading))
        for run in self.runs.values():
            for rank in run.ranks.values():
                if rank.done:
                    continue
                key = (run.key, rank.rank)
                worker = self._reading.get(key)
                if worker is not None and not worker.done():  # a worker reads it
                    backlog = True
                    continue
                due, interval = self._idle.get(key, (0.0, SCAN_SECONDS))
                if now < due:
                    continue
                before = rank.applied
                more = self._read(run, rank, out)
                if more:
                    backlog = True
                elif self.follow and not rank.done:
                    self._check_alive(run, rank, out, now)
                if rank.applied == before and not more:  # idle: look later, up to IDLE_SECONDS
                    interval = min(2 * interval, IDLE_SECONDS)
                    self._idle[key] = (now + interval, interval)
        self.book.settle(now)
        if self._readers is not None and not self._reading and not backlog:
            self._readers.close()  # the history is read: the workers go
            self._readers = None
        self._backlog = backlog
        self._scanned_once = True

    def _read_trainer(self, trainer: TrainerRun | TensorBoardRun, out: list[Keyed]) -> None:
        """Applies what a Trainer's state file (or event files) hold beyond what was applied."""
        messages = trainer.read()
        if not messages:
            return
        run = self.book.run(str(trainer.dir), trainer.name, trainer.dir)
        rank = self.book.rank(run, 0)
        for message in messages:
            self._apply(run, rank, message, out)

    def _discover_registry(self) -> None:
        wanted = set(map(str, self._run_dirs))
        folders = set(map(str, self._folders))
        for entry in discovery.live_runs():
            name = str(entry["run"])
            run_dir = _real_dir(entry.get("dir"))
            if run_dir is None and entry.get("dir"):  # not a path: no run to follow
                continue
            if not self._use_registry and (
                run_dir is None
                or (str(run_dir) not in wanted and str(run_dir.parent) not in folders)
            ):
                continue
            if run_dir is not None:
                run = self._add_run_dir(run_dir, name=name)
            else:
                run = self.book.run(f"live:{name}", name, None)
            try:
                rank = self.book.rank(run, int(entry["rank"]))
            except (TypeError, ValueError):
                continue
            rank.pid = rank.pid or int(entry["pid"])
            rank.start_ticks = rank.start_ticks or entry.get("start_ticks")
            rank.host = rank.host or entry.get("host")
            rank.endpoint = str(entry["endpoint"])
            rank.relayed = "node" in entry  # another node's rank, written here by the relay
            rank.unreachable = entry.get("unreachable") is True  # its node out of reach
            if self._live is not None and not rank.done and "ended" not in entry:
                # Subscribe before reading the file: nothing can fall between the two.
                self._live.connect(rank.endpoint, run.key, rank.rank)

    def _add_run_dir(self, run_dir: Path, name: str | None = None) -> Run:
        run = self.book.run(str(run_dir), name or run_dir.name, run_dir)
        try:
            changed = os.stat(run_dir).st_mtime_ns
        except OSError:
            return run
        # A new file changes its folder's mtime; a recent mtime is listed again regardless, for
        # filesystems whose timestamps are coarse (NFS: a second or two).
        if self._listed.get(run.key) != changed or time.time() - changed / 1e9 < 5.0:
            self._listed[run.key] = changed
            for number in discovery.ranks(run_dir):
                self.book.rank(run, number)
        return run

    def _file(self, run: Run, rank: RankState) -> RankFile | None:
        key = (run.key, rank.rank)
        file = self._files.get(key)
        if file is None and run.dir is not None:
            path = discovery.rank_file(run.dir, rank.rank)
            if path.exists():
                file = self._files[key] = RankFile(path, rank.rank)
        return file

    def _read(self, run: Run, rank: RankState, out: list[Keyed], limit: int = 0) -> bool:
        """Applies what the rank's file holds beyond what was applied, at most ``limit`` bytes
        of it (0: a poll's share); True if more waits."""
        file = self._file(run, rank)
        if file is None:
            return False
        reading = self._reading.pop((run.key, rank.rank), None)
        if reading is not None:  # what a worker read: waited for here (a live frame's gap, a
            # scan), as the file's own read would have taken the time on this thread
            found = Readers.result(reading)
            if found is not None and file.offset == 0 and rank.applied == -1:
                self._adopt(run, rank, file, found)
        elif (
            self._cache
            and file.offset == 0
            and rank.applied == -1
            and run.dir is not None
            and self._restore(run, rank, file, run.dir)
        ):
            return True  # a worker reads it
        lines, more = file.read_lines(limit or self._limit)
        self._take_lines(run, rank, file, lines, out, more)
        if not more and rank.held is not None:
            self._take(run, rank, [], out)  # the file's last line so far: nothing after it
        rank.bad_lines = file.bad_lines
        return more

    def _take_lines(
        self,
        run: Run,
        rank: RankState,
        file: RankFile,
        lines: list[bytes],
        out: list[Keyed],
        more: bool,
    ) -> None:
        """Applies lines read from the rank's file: runs of plain metrics lines (almost all of
        a history) in bulk, :mod:`.bulk`, to the same end as the general path, which takes the
        rest. ``more``: the file holds more than these lines."""
        if not PLAIN_RUNS:
            self._take(run, rank, file.decode_lines(lines), out, more)
            return
        key = run.key

        def take(messages: list[schema.Message]) -> None:
            self._take(run, rank, messages, out, more)

        def take_run(plain: bulk.PlainRun) -> None:
            out.extend([(key, message) for message in plain.messages(rank.rank, self.lines)])
            self._idle.pop((key, rank.rank), None)  # as _apply does: it speaks

        bulk.read_chunk(run, rank, lines, file.decode_lines, take, take_run)

    def _take(
        self,
        run: Run,
        rank: RankState,
        messages: list[schema.Message],
        out: list[Keyed],
        more: bool = False,
    ) -> None:
        """Applies messages read from the rank's file, in file order; ``more``: the file holds
        more than was read (the last message's successor may be there)."""
        if rank.held is not None:  # the last line of the read before: judged by this one's
            messages = [rank.held, *messages]
            rank.held = None
        for index, message in enumerate(messages):
            # The hook writes each seq once, in order: a seq the file already had (a repeated
            # or rewritten line, whatever its content) is not the rank's; count it. Only the
            # sequence's own continuation after a wild jump may go back (see RunBook.apply).
            jump = rank.jump
            if message.seq <= rank.file_seq and not (jump and message.seq == jump[0] + 1):
                rank.bad_seq += 1
                continue
            after = messages[index + 1] if index + 1 < len(messages) else None
            expected = rank.file_seq + 1
            if message.seq > expected and after is None and more:
                # A jump is judged by the line after it, which the next read brings: so what
                # a file gives does not depend on where reads end (a worker's, a poll's).
                rank.held = message
                break
            if message.seq > expected and after is not None and after.seq == expected:
                rank.bad_seq += 1  # a jump the next line does not follow: not the rank's
                continue
            rank.file_seq = message.seq
            self._apply(run, rank, message, out)

    def _check_alive(self, run: Run, rank: RankState, out: list[Keyed], now: float) -> None:
        if rank.pid is None or rank.relayed or (rank.host is not None and rank.host != HOST):
            # Another machine's process (a shared filesystem), or one we know no pid of: its
            # file is all we can know, so it is followed until its end, and given up as
            # "unknown" (never "crashed") once silent for REMOTE_SILENT_SECONDS by our clock, or
            # when its last line is that old by the clock it was written with.
            wrote = time.time() - rank.last_t if rank.last_t is not None else 0.0
            if max(now - rank.last_seen, wrote) > REMOTE_SILENT_SECONDS and not rank.unreachable:
                rank.status = "unknown"
            return
        if registry.pid_alive(rank.pid, rank.start_ticks):
            return
        # Gone without an end message: take what its file holds, then call it crashed.
        while self._read(run, rank, out):
            pass
        if rank.done:
            return
        file = self._files.get((run.key, rank.rank))
        if file is not None:
            file.close()
            rank.bad_lines = file.bad_lines
        self.book.crashed(run, rank)
        if self._live is not None and rank.endpoint:
            self._live.disconnect(rank.endpoint)

    def unsupported(self, key: str) -> str | None:
        """The first "unsupported protocol version" complaint of the run's files."""
        for (run_key, _), file in self._files.items():
            if run_key == key and file.unsupported:
                return file.unsupported
        return None

    # -- applying messages ----------------------------------------------------------------------

    def _apply(
        self,
        run: Run,
        rank: RankState,
        message: schema.Message,
        out: list[Keyed],
        live: bool = False,
    ) -> None:
        if self.book.apply(run, rank, message):
            out.append((run.key, message))
            key = (run.key, rank.rank)
            if not live:
                self._idle.pop(key, None)  # it speaks: read it at the full pace
            elif self._idle.get(key, (0.0, 0.0))[1] < LIVE_FILE_SECONDS:
                # Its file repeats its frames: read it (for a frame the live path lost, a
                # process gone) every LIVE_FILE_SECONDS, then every IDLE_SECONDS while it holds
                # nothing new, not at every scan. A frame never moves a read already planned.
                self._idle[key] = (time.monotonic() + LIVE_FILE_SECONDS, LIVE_FILE_SECONDS)
            if rank.done and self._live is not None and rank.endpoint:
                self._live.disconnect(rank.endpoint)

    def _drain_live(self, out: list[Keyed], wait: float) -> None:
        """Takes the live frames waiting. Idle (``wait`` > 0), it waits for one, lets those of
        the next LIVE_DRAIN_SECONDS gather in their sockets, then takes them all: 16 ranks send
        a frame every 1.5 ms, and waking for each cost the viewer more than all else it does
        with them. At most LIVE_DRAIN_SECONDS of taking, LIVE_DRAIN_FRAMES frames."""
        assert self._live is not None
        received = self._live.receive(wait)
        if received is None:
            self._live_behind = False
            return
        if wait > 0:
            time.sleep(LIVE_DRAIN_SECONDS)  # the sockets hold what comes meanwhile (RCVHWM)
        deadline = time.monotonic() + LIVE_DRAIN_SECONDS
        taken = 0
        while True:
            (key, number), frame = received
            self._apply_frame(key, number, frame, out)
            taken += 1
            if taken >= LIVE_DRAIN_FRAMES or time.monotonic() > deadline:
                # Stopped by a limit (more than ~10,000 frames a second): the next poll takes
                # what waits at once, with no wait, until it has caught up.
                self._live_behind = True
                return
            received = self._live.receive(0.0)
            if received is None:
                self._live_behind = False
                return

    def _apply_frame(self, key: str, number: int, frame: bytes, out: list[Keyed]) -> None:
        run = self.runs.get(key)
        rank = run.ranks.get(number) if run is not None else None
        for line in frame.split(b"\n"):
            if not line:
                continue
            try:
                message = schema.decode(line)
            except schema.BadMessage:
                self.bad_live += 1
                continue
            if run is None or rank is None or message.rank != number:
                self.bad_live += 1  # not what this endpoint publishes
                continue
            if message.seq <= rank.applied:
                continue
            if message.seq > rank.applied + 1:
                while self._read(run, rank, out):  # the file holds everything before it
                    pass
            self._apply(run, rank, message, out, live=True)


def _real_dir(path: Any) -> Path | None:
    """A run directory as the follower keys it (every link resolved), or None for what is no
    path (a registry entry without one, from an old hook; a number; a NUL in it)."""
    if not isinstance(path, (str, Path)) or not str(path):
        return None
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):
        return None


class _LiveSockets:
    """One SUB socket per publishing rank, so each frame is known by where it came from."""

    def __init__(self) -> None:
        import zmq

        self._zmq = zmq
        self._context = zmq.Context(io_threads=1)
        self._poller = zmq.Poller()
        self._sockets: dict[str, Any] = {}  # endpoint -> socket
        self._routes: dict[Any, tuple[str, int]] = {}  # socket -> (run key, rank)
        self._ready: list[Any] = []

    def connect(self, endpoint: str, key: str, rank: int) -> None:
        """Subscribes to ``endpoint`` (an ``ipc://`` path) as rank ``rank`` of run ``key``."""
        if endpoint in self._sockets or not endpoint.startswith("ipc://"):
            return
        zmq = self._zmq
        sock = self._context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        self._sockets[endpoint] = sock
        self._routes[sock] = (key, rank)
        self._poller.register(sock, zmq.POLLIN)

    def disconnect(self, endpoint: str) -> None:
        """Closes the socket of a rank that ended."""
        sock = self._sockets.pop(endpoint, None)
        if sock is not None:
            self._poller.unregister(sock)
            self._routes.pop(sock, None)
            self._ready = [s for s in self._ready if s is not sock]
            sock.close(linger=0)

    def receive(self, wait: float) -> tuple[tuple[str, int], bytes] | None:
        """The next frame and its route, waiting at most ``wait`` seconds; None when idle."""
        zmq = self._zmq
        while True:
            while self._ready:  # round robin: a busy rank does not starve the others
                sock = self._ready.pop(0)
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                self._ready.append(sock)
                return self._routes[sock], frame
            if not self._sockets:
                if wait > 0:
                    time.sleep(wait)
                return None
            self._ready = [sock for sock, _ in self._poller.poll(int(wait * 1000))]
            if not self._ready:
                return None
            wait = 0.0

    def close(self) -> None:
        """Closes every socket; returns at once (LINGER 0)."""
        for endpoint in list(self._sockets):
            self.disconnect(endpoint)
        self._context.term()
