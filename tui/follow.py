"""Following runs: history from the run files, live messages over ZeroMQ, merged exactly once.

This is the zguide's Clone pattern with the run file as the snapshot. For each rank the follower
subscribes to the rank's socket first, then reads its file, then applies live messages whose
``seq`` is newer than the last one applied. The hook writes a message to the file before it sends
it live, so a live message that skips ahead means the file already holds the ones in between:
they are read from there, never invented. Files are also read on a timer, which picks up ranks
without a live path and anything the live path dropped.

A run ends when every rank sent ``end``; a rank whose process is gone without one is ``crashed``.
Nothing here imports Textual: the app and the headless printer are two views of a Follower.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtop.hooks import registry, schema

from . import discovery
from .runfile import RankFile

SCAN_SECONDS = 0.25  # how often files are read and processes checked
FOLDER_SCAN_SECONDS = 1.0  # how often folders are searched for new runs
MISSING_RANK_GRACE = 5.0  # ranks that never showed up stop holding a finished run open
SILENT_UNKNOWN_SECONDS = 10.0  # a rank whose liveness cannot be checked, silent this long, is done
LIVE_DRAIN_FRAMES = 2000
LIVE_DRAIN_SECONDS = 0.05

HOST = socket.gethostname()


@dataclass(slots=True)
class RankState:
    """What is known of one rank of a run."""

    rank: int
    file: RankFile | None = None
    applied: int = -1  # seq of the last message applied
    gaps: int = 0  # messages that never arrived (seq numbers skipped)
    messages: int = 0
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

    @property
    def done(self) -> bool:
        """Whether this rank will publish nothing more."""
        return self.status is not None


@dataclass(slots=True)
class Run:
    """One run: every rank's state, by rank."""

    key: str  # the run directory's real path, or "live:<name>" without one
    name: str
    dir: Path | None
    ranks: dict[int, RankState] = field(default_factory=dict)
    world: int = 1
    first_seen: float = field(default_factory=time.monotonic)
    done_since: float | None = None

    @property
    def bad_lines(self) -> int:
        """Lines of the run files that were not protocol messages."""
        return sum(r.file.bad_lines for r in self.ranks.values() if r.file)

    @property
    def dropped(self) -> int:
        """Messages that never arrived (gaps in ``seq``)."""
        return sum(r.gaps for r in self.ranks.values())

    @property
    def info(self) -> dict[str, Any]:
        """The start info of the lowest rank that has one."""
        for rank in sorted(self.ranks):
            if self.ranks[rank].info:
                return self.ranks[rank].info or {}
        return {}

    @property
    def config(self) -> dict[str, Any]:
        """The hyper-parameters recorded at start."""
        config = self.info.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def all_done(self) -> bool:
        """Every rank has ended (or crashed) and no missing rank is still awaited."""
        if not self.ranks or not all(r.done for r in self.ranks.values()):
            return False
        if len(self.ranks) >= self.world:
            return True
        return (
            self.done_since is not None and time.monotonic() - self.done_since > MISSING_RANK_GRACE
        )

    @property
    def state(self) -> str:
        """``live``, ``finished``, ``failed`` (a rank ended with an error) or ``crashed``."""
        statuses = {r.status for r in self.ranks.values()}
        if not self.all_done:
            return "crashed" if "crashed" in statuses and None not in statuses else "live"
        if "crashed" in statuses:
            return "crashed"
        if statuses - {"ok", "unknown"}:
            return "failed"
        return "finished"


class Follower:
    """Discovers runs and yields each of their messages once, in per-rank order.

    Args:
        paths: run directories, rank files or folders of runs; none means this user's live runs.
        follow: keep reading as runs grow; without it, read what is there and stop.
        live: subscribe to the ranks' ZeroMQ sockets (files alone otherwise).
    """

    def __init__(self, paths: Sequence[str] = (), follow: bool = True, live: bool = True) -> None:
        self.follow = follow
        self.runs: dict[str, Run] = {}
        self._by_name: dict[str, Run] = {}
        self._use_registry = not paths
        run_dirs, folders = discovery.resolve(list(paths))
        self._run_dirs = [Path(os.path.realpath(p)) for p in run_dirs]
        self._folders = [Path(os.path.realpath(p)) for p in folders]
        self._last_scan = -1e9
        self._last_folder_scan = -1e9
        self._backlog = False
        self._connected: set[str] = set()
        self._zmq: Any = None
        self._context: Any = None
        self._sub: Any = None
        self._poller: Any = None
        if follow and live:
            import zmq

            self._zmq = zmq
            self._context = zmq.Context(io_threads=1)
            self._sub = self._context.socket(zmq.SUB)
            self._sub.setsockopt(zmq.LINGER, 0)
            self._sub.setsockopt(zmq.RCVHWM, 100_000)
            self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            self._poller = zmq.Poller()
            self._poller.register(self._sub, zmq.POLLIN)
        self._scanned_once = False
        self.bad_live = 0  # live frames that were not messages (they name no run to blame)

    # -- the loop -------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.1) -> list[schema.Message]:
        """Returns the messages that became known since the last call, waiting at most
        ``timeout`` seconds for live ones when there is nothing to read."""
        out: list[schema.Message] = []
        now = time.monotonic()
        if self._backlog or now - self._last_scan >= SCAN_SECONDS:
            self._scan(out, now)
        if self._sub is not None:
            wait = 0.0 if (out or self._backlog) else min(timeout, SCAN_SECONDS)
            self._drain_live(out, wait)
        elif not out and not self._backlog and timeout > 0:
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
        return bool(self.runs) and all(run.all_done for run in self.runs.values())

    def close(self) -> None:
        """Closes the live socket; returns at once (LINGER 0)."""
        if self._sub is not None:
            self._sub.close(linger=0)
            self._context.term()
            self._sub = None

    # -- discovery and files --------------------------------------------------------------------

    def _scan(self, out: list[schema.Message], now: float) -> None:
        self._last_scan = now
        if self._use_registry or (self.follow and self._sub is not None):
            self._discover_registry()
        if now - self._last_folder_scan >= FOLDER_SCAN_SECONDS or not self._scanned_once:
            self._last_folder_scan = now
            for run_dir in self._run_dirs:
                self._add_run_dir(run_dir)
            for folder in self._folders:
                for run_dir in discovery.run_dirs(folder):
                    self._add_run_dir(Path(os.path.realpath(run_dir)))
            for run in list(self.runs.values()):  # ranks that came and went between scans
                if run.dir is not None:
                    self._add_run_dir(run.dir)
        backlog = False  # set once at the end: the app's thread reads it meanwhile
        for run in self.runs.values():
            for rank in run.ranks.values():
                if rank.done:
                    continue
                if self._read(run, rank, out):
                    backlog = True
                elif self.follow and not rank.done:
                    self._check_alive(run, rank, out, now)
            if run.done_since is None and run.ranks and all(r.done for r in run.ranks.values()):
                run.done_since = now
        self._backlog = backlog
        self._scanned_once = True

    def _discover_registry(self) -> None:
        wanted = set(map(str, self._run_dirs))
        folders = set(map(str, self._folders))
        for entry in discovery.live_runs():
            run_dir = Path(os.path.realpath(entry["dir"]))
            if (
                not self._use_registry
                and str(run_dir) not in wanted
                and str(run_dir.parent) not in folders
            ):
                continue
            run = self._add_run_dir(run_dir, name=str(entry["run"]))
            try:
                rank = self._rank(run, int(entry["rank"]))
            except (TypeError, ValueError):
                continue
            rank.pid = rank.pid or int(entry["pid"])
            rank.start_ticks = rank.start_ticks or entry.get("start_ticks")
            rank.host = rank.host or entry.get("host")
            endpoint = str(entry["endpoint"])
            rank.endpoint = endpoint
            if (
                self._sub is not None
                and endpoint not in self._connected
                and endpoint.startswith("ipc://")
            ):
                # Subscribe before reading the file: nothing can fall between the two.
                self._sub.connect(endpoint)
                self._connected.add(endpoint)

    def _add_run_dir(self, run_dir: Path, name: str | None = None) -> Run:
        key = str(run_dir)
        run = self.runs.get(key)
        if run is None:
            run = Run(key=key, name=name or run_dir.name, dir=run_dir)
            self.runs[key] = run
            self._by_name.setdefault(run.name, run)
        for number in discovery.rank_files(run_dir):
            self._rank(run, number)
        return run

    def _rank(self, run: Run, number: int) -> RankState:
        rank = run.ranks.get(number)
        if rank is None:
            rank = RankState(rank=number, last_seen=time.monotonic())
            run.ranks[number] = rank
            run.world = max(run.world, number + 1)
            run.done_since = None
        if rank.file is None and run.dir is not None:
            path = run.dir / f"rank-{number}.jsonl"
            if path.exists():
                rank.file = RankFile(path, number)
        return rank

    def _read(self, run: Run, rank: RankState, out: list[schema.Message]) -> bool:
        """Applies what the rank's file holds beyond what was applied; True if more waits."""
        if rank.file is None:
            if run.dir is None:
                return False
            self._rank(run, rank.rank)
            if rank.file is None:
                return False
        messages, more = rank.file.read()
        for message in messages:
            self._apply(run, rank, message, out)
        return more

    def _check_alive(
        self, run: Run, rank: RankState, out: list[schema.Message], now: float
    ) -> None:
        if rank.host is not None and rank.host != HOST:
            rank.status = "unknown"  # another machine's process: its file is all we can know
            return
        if rank.pid is None:
            if now - rank.last_seen > SILENT_UNKNOWN_SECONDS:
                rank.status = "unknown"
            return
        if registry.pid_alive(rank.pid, rank.start_ticks):
            return
        # Gone without an end message: take what its file holds, then call it crashed.
        while self._read(run, rank, out):
            pass
        if rank.done:
            return
        if rank.file is not None:
            rank.file.close()
        rank.status = "crashed"
        rank.last_seen = now

    # -- applying messages ----------------------------------------------------------------------

    def _apply(
        self, run: Run, rank: RankState, message: schema.Message, out: list[schema.Message]
    ) -> None:
        if message.seq <= rank.applied or rank.done:
            return
        rank.gaps += message.seq - rank.applied - 1
        rank.applied = message.seq
        rank.messages += 1
        rank.last_t = message.t
        rank.last_seen = time.monotonic()
        if message.step is not None:
            rank.last_step = message.step
        kind = message.kind
        if kind == schema.START:
            rank.started = message.t
            info = message.data.get("info")
            if isinstance(info, dict):
                rank.info = info
                pid, ticks, host = info.get("pid"), info.get("start_ticks"), info.get("host")
                rank.pid = pid if type(pid) is int else rank.pid
                rank.start_ticks = ticks if type(ticks) is int else rank.start_ticks
                rank.host = host if type(host) is str else rank.host
            if run.name != message.run and run.name == (run.dir.name if run.dir else None):
                run.name = message.run
            self._by_name.setdefault(message.run, run)
        elif kind == schema.END:
            status = message.data.get("status")
            rank.status = status if isinstance(status, str) and status else "ok"
            error = message.data.get("error")
            rank.error = error if isinstance(error, str) else None
            problems = message.data.get("problems")
            if isinstance(problems, dict):
                rank.problems = {str(k): v for k, v in problems.items() if type(v) is int}
        run.world = max(run.world, message.world)
        out.append(message)

    def _drain_live(self, out: list[schema.Message], wait: float) -> None:
        zmq = self._zmq
        if not self._poller.poll(wait * 1000):
            return
        deadline = time.monotonic() + LIVE_DRAIN_SECONDS
        for _ in range(LIVE_DRAIN_FRAMES):
            try:
                frame = self._sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._apply_frame(frame, out)
            if time.monotonic() > deadline:
                return

    def _apply_frame(self, frame: bytes, out: list[schema.Message]) -> None:
        for line in frame.split(b"\n"):
            if not line:
                continue
            try:
                message = schema.decode(line)
            except schema.BadMessage:
                self.bad_live += 1
                continue
            run = self._by_name.get(message.run)
            rank = run.ranks.get(message.rank) if run is not None else None
            if run is None or rank is None:
                continue  # not a rank we follow (yet); its file will bring it
            if message.seq <= rank.applied:
                continue
            if message.seq > rank.applied + 1:
                while self._read(run, rank, out):  # the file holds everything before it
                    pass
            self._apply(run, rank, message, out)
