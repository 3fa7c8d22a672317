"""Node 0's side of the relay: a thread of global rank 0 that takes every other node's ranks.

It binds one CurveZMQ ROUTER socket (``LMTOP_PORT``) on the interface that reaches
``MASTER_ADDR``, with a ZAP handler (``ThreadAuthenticator``) that accepts only clients whose
public key is this user's own (see ``keys.py``); a client with another key, or without
encryption, fails the handshake and is counted, never read. Everything a relay sends is
validated with :mod:`.schema` line by line, bounded in size, and written only as a rank file
this aggregator created itself: never over a rank of node 0, never twice.

Each remote rank's messages are written to ``rank-N.jsonl`` strictly in ``seq`` order, then
republished on an ``ipc://`` socket registered in node 0's registry under ``<pid>.<rank>``, so
a viewer follows a remote rank exactly as a local one. A message ahead of the next one wanted
is set aside and the relay is asked for the missing ones by (rank, seq); it answers from its
node's files. A node not heard from for ``LINK_TIMEOUT`` is marked ``unreachable`` in those
registry entries, which the viewer shows instead of calling its ranks silent or crashed.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from . import registry, schema
from .keys import Keypair
from .relay import (
    ACK,
    HELLO,
    LINES,
    LINK_TIMEOUT,
    UNSEEN_GRACE,
    WANT,
    control,
    curve,
    drain,
    grace,
)

if TYPE_CHECKING:
    from .publisher import Problems

ASK_AGAIN = 1.0  # seconds before the same (rank, seq) is asked for again
# Asks for the same missing line, while later ones wait, before it is given up: a line the
# node's own file lacks (its write failed there) would otherwise hold the rank back for good.
GIVE_UP_ASKS = 10
# Lines ahead of a gap kept per rank until the relay's files fill it; past this, later lines
# are dropped too and come from the files as well.
MAX_AHEAD = 4096
RECEIVE_HWM = 10_000


@dataclass(slots=True)
class RemoteRank:
    """One rank of another node, as node 0 holds it."""

    rank: int
    node: int
    fd: int | None  # its file in node 0's run directory; None when not ours to write
    next: int = 0  # the seq wanted next
    ended: bool = False
    pub: Any = None  # its ipc PUB socket on node 0
    endpoint: str = ""  # that socket's endpoint
    entry: Path | None = None  # its registry entry
    asked: tuple[int, float] = (-1, 0.0)  # (from seq, when) of the last want
    tries: int = 0  # wants in a row for that seq
    torn: bool = False  # its file ends in part of a line (a failed write): the next starts anew
    ahead: dict[int, tuple[bytes, str]] = field(default_factory=dict)  # seq -> (line, kind)


@dataclass(slots=True)
class Node:
    """One other node of the launch, known by its node rank."""

    number: int
    peer: bytes = b""  # its relay's current connection
    heard: float = 0.0  # monotonic
    shared: bool = False  # it writes into this very run directory: nothing to relay
    reachable: bool = True
    have: dict[int, int] = field(default_factory=dict)  # rank -> last seq in its files
    done: set[int] = field(default_factory=set)  # its ranks that ended or whose process is gone


class _OnlyOurKey:
    """ZAP: a client is accepted when its public key is this user's own."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public


class Aggregator:
    """Receives the other nodes' ranks; writes and republishes them on node 0 (a thread)."""

    def __init__(
        self,
        run_dir: Path,
        run: str,
        launch: str,
        endpoint: str | Callable[[], str],
        keys: Keypair,
        problems: Problems,
        file_mode: int = 0o600,
        world: int = schema.MAX_RANK,
    ) -> None:
        self.run_dir = run_dir
        self.run = run
        self.launch = launch
        # Found in the aggregator's thread when given as a function: finding the interface
        # that reaches MASTER_ADDR can wait on DNS, never the training thread's init().
        self.endpoint = endpoint if isinstance(endpoint, str) else ""
        self._where = endpoint
        self.rejected = 0  # handshakes refused: a wrong key, or no encryption
        self.refused = 0  # lines and frames that were not taken (invalid, not ours to write)
        self.written = 0  # remote messages written into the run directory
        self.expected = 0  # other nodes awaited at the end, when they have not said hello yet
        self.ranks: dict[int, RemoteRank] = {}
        self.nodes: dict[int, Node] = {}
        self._peers: dict[bytes, Node] = {}
        self._keys = keys
        self._problems = problems
        self._file_mode = file_mode
        self._world = world  # ranks at or past the world size are nobody's
        self._deadline = self._stopped_at = 0.0
        self._stopping = threading.Event()
        self.ready = threading.Event()  # bound and listening (or given up)
        self._thread = threading.Thread(target=self._main, name="lmtop-aggregator", daemon=True)
        self._thread.start()

    def close(self, seconds: float | None = None) -> None:
        """Takes what reachable nodes still send, for at most ``seconds`` (default
        :func:`~.relay.grace`), then stops."""
        seconds = grace() if seconds is None else seconds
        self._stopped_at = time.monotonic()
        self._deadline = self._stopped_at + seconds
        self._stopping.set()
        self._thread.join(seconds + 0.5)

    # -- the thread -----------------------------------------------------------------------------

    def _main(self) -> None:
        import zmq
        from zmq.auth.thread import ThreadAuthenticator

        context = zmq.Context(io_threads=1)
        auth = None
        try:
            auth = ThreadAuthenticator(context)
            auth.start()
            auth.configure_curve_callback("*", _OnlyOurKey(self._keys.public))
            server = context.socket(zmq.ROUTER)
            curve(server, self._keys, server=True)
            server.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            server.setsockopt(zmq.SNDHWM, RECEIVE_HWM)
            monitor = server.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            )
            if not self.endpoint and callable(self._where):
                self.endpoint = self._where()
            server.bind(self.endpoint)
            self.ready.set()
            self._run(zmq, context, server, monitor)
        except Exception as exc:
            self._problems("node 0 takes no other node's ranks (relay stopped)", repr(exc)[:200])
        finally:
            self.ready.set()
            for remote in self.ranks.values():
                if remote.entry is not None:
                    registry.mark_ended(remote.entry)
                    registry.unregister(Path(remote.endpoint.removeprefix("ipc://")))
                if remote.fd is not None:
                    os.close(remote.fd)
                    remote.fd = None
            if auth is not None:
                auth.stop()
            context.destroy(linger=0)

    def _run(self, zmq: Any, context: Any, server: Any, monitor: Any) -> None:
        poller = zmq.Poller()
        poller.register(server, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        next_tick = 0.0
        while True:
            now = time.monotonic()
            if now >= next_tick:
                self._judge_links(now)
                next_tick = now + 0.5
            if self._stopping.is_set() and (now > self._deadline or self._complete()):
                return
            for sock, _ in poller.poll(100):
                for frames in drain(zmq, sock):
                    if sock is monitor:
                        self._rejected()
                    else:
                        self._receive(zmq, context, server, frames)

    def _complete(self) -> bool:
        """Whether nothing more is expected from a reachable node."""
        if len(self.nodes) < self.expected and time.monotonic() - self._stopped_at < UNSEEN_GRACE:
            return False
        for node in self.nodes.values():
            if not node.reachable or node.shared:
                continue
            for rank, last in node.have.items():
                remote = self.ranks.get(rank)
                if remote is None or remote.fd is None:
                    continue  # not ours to write
                if remote.next <= last or not (remote.ended or rank in node.done):
                    return False
        return True

    def _rejected(self) -> None:
        self.rejected += 1
        self._problems(
            "relay connections rejected (a wrong key or no encryption; nothing was read)",
            self.endpoint,
        )

    # -- frames ---------------------------------------------------------------------------------

    def _receive(self, zmq: Any, context: Any, server: Any, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self.refused += 1
            return
        peer, kind, payload = frames
        if kind == HELLO:
            self._hello(zmq, context, server, peer, payload)
        elif kind == LINES and peer in self._peers:
            self._lines(zmq, server, self._peers[peer], payload)
        else:
            self.refused += 1

    def _hello(self, zmq: Any, context: Any, server: Any, peer: bytes, payload: bytes) -> None:
        data = control(payload)
        number = data.get("node") if data is not None else None
        have = data.get("have") if data is not None else None
        if (
            data is None
            or data.get("launch") != self.launch
            or type(number) is not int
            or not 0 < number < schema.MAX_RANK
            or type(have) is not dict
        ):
            self.refused += 1
            self._problems("relays of another launch (or garbled) ignored", str(number)[:20])
            return
        node = self.nodes.get(number)
        if node is None:
            node = self.nodes[number] = Node(number)
            node.shared = self._shares_directory(number, data.get("nonce"))
        if node.peer != peer:
            self._peers.pop(node.peer, None)
            node.peer = peer
            self._peers[peer] = node
        node.heard = time.monotonic()
        done = data.get("done")
        if type(done) is list:
            node.done = {r for r in done[: len(have)] if type(r) is int}
        if not node.reachable:
            node.reachable = True
            self._mark(node)
        acked = {}
        for key, last in have.items():
            if not (key.isdigit() and type(last) is int) or node.shared:
                continue
            remote = self._claim(context, int(key), node)
            if remote is None:
                continue
            node.have[remote.rank] = last
            # A rank not ours to write (already here) is acked whole: nothing to send.
            acked[key] = remote.next if remote.fd is not None else last + 1
            if last >= remote.next and remote.fd is not None:
                self._ask(zmq, server, node, remote)
        reply = orjson.dumps({"acked": acked, "shared": node.shared})
        self._send(zmq, server, peer, ACK, reply)

    def _lines(self, zmq: Any, server: Any, node: Node, payload: bytes) -> None:
        if node.shared:
            return
        batches: dict[int, list[bytes]] = {}
        for line in payload.split(b"\n"):
            if not line:
                continue
            if len(line) > schema.MAX_MESSAGE_BYTES:  # no hook writes one
                self.refused += 1
                continue
            try:
                message = schema.decode(line)
            except schema.BadMessage:
                self.refused += 1
                continue
            remote = self.ranks.get(message.rank)
            if remote is None or remote.node != node.number or remote.fd is None:
                self.refused += 1  # not a rank this node said it has, or not ours to write
                continue
            if message.seq != remote.next or remote.ended:
                if message.seq > remote.next and not remote.ended:
                    if len(remote.ahead) < MAX_AHEAD:
                        remote.ahead[message.seq] = (line, message.kind)
                    self._ask(zmq, server, node, remote)  # the file has the ones between
                continue
            batch = batches.setdefault(remote.rank, [])
            self._take(remote, batch, line, message.kind)
            while remote.next in remote.ahead and not remote.ended:
                self._take(remote, batch, *remote.ahead.pop(remote.next))
        for rank, lines in batches.items():
            self._write(zmq, self.ranks[rank], b"".join(lines))
        # Whatever this frame left missing is asked for again once the fill has been taken.
        for rank in batches:
            remote = self.ranks[rank]
            if node.have.get(rank, -1) >= remote.next:
                self._ask(zmq, server, node, remote)

    @staticmethod
    def _take(remote: RemoteRank, batch: list[bytes], line: bytes, kind: str) -> None:
        batch.append(line + b"\n")
        remote.next += 1
        remote.ended = kind == schema.END
        if remote.ended:
            remote.ahead.clear()

    def _write(self, zmq: Any, remote: RemoteRank, data: bytes) -> None:
        assert remote.fd is not None
        view = memoryview(b"\n" + data if remote.torn else data)
        try:
            while view:  # a short write (a full disk, a signal) is followed by the rest
                view = view[os.write(remote.fd, view) :]
            remote.torn = False
        except OSError as exc:
            # What did not reach the file stays in the node's own; a part of a line is ended by
            # the next write's newline, so that no two lines are ever glued into one.
            remote.torn = True
            self._problems("cannot write another node's rank on node 0", exc)
        self.written += data.count(b"\n")
        if remote.pub is not None:
            try:
                remote.pub.send(data, zmq.NOBLOCK)
            except zmq.Again:
                pass  # a slow viewer: it reads them from the file

    def _ask(self, zmq: Any, server: Any, node: Node, remote: RemoteRank) -> None:
        start, when = remote.asked
        now = time.monotonic()
        if start == remote.next and now - when < ASK_AGAIN:
            return  # asked already; the answer is on its way
        remote.tries = remote.tries + 1 if start == remote.next else 1
        if remote.tries > GIVE_UP_ASKS and remote.ahead:
            self._skip(zmq, remote)  # the node's file lacks it: what follows is taken
            if node.have.get(remote.rank, -1) < remote.next:
                return
        remote.asked = (remote.next, now)
        want = orjson.dumps({"rank": remote.rank, "from": remote.next})
        self._send(zmq, server, node.peer, WANT, want)

    @staticmethod
    def _send(zmq: Any, server: Any, peer: bytes, kind: bytes, payload: bytes) -> None:
        try:
            server.send_multipart([peer, kind, payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # gone or slow: it says hello again

    # -- ranks and nodes ------------------------------------------------------------------------

    def _shares_directory(self, number: int, nonce: Any) -> bool:
        """Whether the node writes into this run directory itself (a shared LMTOP_DIR): its
        relay left a nonce beside its files, and here it is."""
        try:
            here = (self.run_dir / f".node-{number}").read_text()
        except (OSError, UnicodeDecodeError):
            return False
        return type(nonce) is str and here == nonce

    def _skip(self, zmq: Any, remote: RemoteRank) -> None:
        """Gives up the lines before the first one waiting (a gap the viewer counts as lost
        messages, as it counts any seq skipped) and writes those that follow it."""
        first = min(remote.ahead)
        self._problems("lines missing from another node's own file (skipped)", first - remote.next)
        remote.next, remote.tries = first, 0
        batch: list[bytes] = []
        while remote.next in remote.ahead and not remote.ended:
            self._take(remote, batch, *remote.ahead.pop(remote.next))
        self._write(zmq, remote, b"".join(batch))

    def _claim(self, context: Any, rank: int, node: Node) -> RemoteRank | None:
        """The remote rank, taken on when first named: its file and its live socket on node 0."""
        remote = self.ranks.get(rank)
        if remote is not None:
            return remote if remote.node == node.number else None
        if not 0 <= rank < self._world:
            return None
        path = self.run_dir / schema.rank_file(rank)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        try:
            fd: int | None = os.open(path, flags, self._file_mode)
        except FileExistsError:  # a rank of node 0, or already here: never written twice
            fd = None
            self._problems("ranks relayed to node 0 but already in its run directory", rank)
        except OSError as exc:
            fd = None
            self._problems("cannot write another node's rank on node 0", exc)
        remote = self.ranks[rank] = RemoteRank(rank, node.number, fd)
        if fd is not None:
            self._publish_live(context, remote)
        return remote

    def _publish_live(self, context: Any, remote: RemoteRank) -> None:
        import zmq

        try:
            name = f"{os.getpid()}.{remote.rank}"
            endpoint = f"ipc://{registry.runtime_dir()}/{name}.sock"
            pub = context.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, 2000)
            pub.bind(endpoint)
            remote.pub, remote.endpoint = pub, endpoint
            remote.entry = registry.register(self._entry(remote, endpoint), name)
        except Exception as exc:
            self._problems("other nodes' ranks are not live on node 0 (files only)", exc)

    def _entry(self, remote: RemoteRank, endpoint: str) -> registry.Entry:
        pid = os.getpid()
        entry: registry.Entry = {
            "pid": pid,
            "start_ticks": registry.process_start_ticks(pid),
            "host": socket.gethostname(),
            "run": self.run,
            "rank": remote.rank,
            "world": remote.rank + 1,
            "dir": str(self.run_dir),
            "live_only": False,
            "endpoint": endpoint,
            "started": time.time(),
            "node": remote.node,
        }
        if not self.nodes[remote.node].reachable:
            entry["unreachable"] = True
        return entry

    def _judge_links(self, now: float) -> None:
        for node in self.nodes.values():
            reachable = now - node.heard < LINK_TIMEOUT
            if reachable != node.reachable and not node.shared:
                node.reachable = reachable
                self._mark(node)

    def _mark(self, node: Node) -> None:
        """Rewrites the registry entries of the node's ranks with its reachability."""
        for remote in self.ranks.values():
            if remote.node == node.number and remote.entry is not None:
                registry.register(self._entry(remote, remote.endpoint), remote.entry.stem)
