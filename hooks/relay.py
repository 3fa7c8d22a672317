"""Several nodes without a shared filesystem: every node's ranks reach node 0 over CurveZMQ TCP.

No daemon: in a launch that spans nodes, the process of local rank 0 on every node but the
first runs a :class:`Relay` thread, and global rank 0 runs an :class:`~.aggregator.Aggregator`
thread. The relay subscribes to its node's ranks over ``ipc://`` (as a viewer does) and forwards
their frames; the aggregator writes each remote rank's messages into node 0's run directory
(``rank-N.jsonl``, the same lines) and republishes them on ``ipc://`` there, so a viewer on
node 0 works exactly as on one machine.

The live path may lose frames (the relay drops rather than blocks, and a link can go down); the
node's own run files never do. Twice a second the relay tells the aggregator how far each local
rank file goes; the aggregator writes each rank's messages strictly in ``seq`` order and asks the
relay for what it misses by (rank, seq); the relay answers from its files. Node 0's copy is
complete once the link has been up for a moment after the last message.

Frames, relay to aggregator: ``[hello, JSON]`` (launch, node, the files' last seqs, a nonce
written beside them) and ``[lines, JSON lines]``; aggregator to relay: ``[ack, JSON]`` (next seq
wanted per rank; ``shared`` when node 0 sees the nonce, so the two nodes share the run
directory and nothing is relayed) and ``[want, JSON]`` (rank, from seq). Only zmq and the
standard library are used here.
"""

from __future__ import annotations

import bisect
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from . import registry, schema
from .identity import Identity, multi_node
from .keys import Keypair

if TYPE_CHECKING:
    from .aggregator import Aggregator
    from .publisher import Problems

HELLO, LINES, ACK, WANT = b"hello", b"lines", b"ack", b"want"
# The relay's port, unless LMTOP_PORT says otherwise: MASTER_PORT + 1 (29501 with the launchers'
# default 29500), so two launches on one master node, which need two master ports, get two.
DEFAULT_PORT = 29501
COALESCE_SECONDS = 0.005  # a node's frames of this long go to node 0 as one
HELLO_SECONDS = 0.5  # how often a relay says how far its files go
LINK_TIMEOUT = 3.0  # a node not heard from this long is unreachable
MAX_FRAME_BYTES = 4 << 20  # the aggregator drops a peer that sends a bigger frame
MAX_CONTROL_BYTES = 1 << 20
FILL_BYTES = 1 << 20  # lines sent per answer to a ``want``
SEND_HWM = 1000  # frames queued towards node 0 before the relay drops (and counts)
# At finish, how long a relay or the aggregator may wait for the last lines of ranks that are
# still running (ranks of a node end within milliseconds of each other after a barrier, but a
# starved or slow one can end seconds later); nothing is waited for once all have ended.
CLOSE_GRACE = 3.0
NEVER_UP_SECONDS = 30.0  # a relay never answered this long says so (a firewall, LMTOP_PORT)
UNSEEN_GRACE = 1.0  # how long the aggregator waits at finish for a node never heard from
READ_BUDGET = 8 << 20  # bytes of one rank file a relay reads per look
INDEX_EVERY = 256  # lines between two entries of a rank file's (seq, offset) index


def port() -> int:
    """``$LMTOP_PORT``, else ``$MASTER_PORT`` + 1, else 29501."""
    for name, offset in (("LMTOP_PORT", 0), ("MASTER_PORT", 1)):
        try:
            return int(os.environ[name]) + offset
        except (KeyError, ValueError):
            continue
    return DEFAULT_PORT


def node_rank() -> int:
    """This node's rank in the launch (torchrun's GROUP_RANK, SLURM_NODEID, NODE_RANK), else
    RANK // LOCAL_WORLD_SIZE (nodes of equal size, as launchers start them); -1 if unknown."""
    for name in ("GROUP_RANK", "SLURM_NODEID", "NODE_RANK"):
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    try:
        return int(os.environ["RANK"]) // max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    except (KeyError, ValueError):
        return -1


def grace() -> float:
    """How long, at ``finish``, a relay or the aggregator may wait for the last lines of the
    other ranks: ``$LMTOP_RELAY_GRACE`` seconds, else 3; only while some still run."""
    try:
        return max(0.0, min(60.0, float(os.environ["LMTOP_RELAY_GRACE"])))
    except (KeyError, ValueError):
        return CLOSE_GRACE


def nodes() -> int:
    """How many nodes the launch spans, as the launcher says (1 when it does not)."""
    for name in ("GROUP_WORLD_SIZE", "SLURM_NNODES", "NNODES"):
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


def tcp(address: str, number: int) -> str:
    """A ZeroMQ TCP endpoint (IPv6 addresses in brackets)."""
    return f"tcp://[{address}]:{number}" if ":" in address else f"tcp://{address}:{number}"


def bind_address(master: str) -> str:
    """The local address of the interface that reaches ``master`` (usually its own address)."""
    family, _, _, _, where = socket.getaddrinfo(master, None, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((where[0], 9))  # UDP: picks the route, sends nothing
        return str(probe.getsockname()[0])


def control(payload: bytes) -> dict[str, Any] | None:
    """A control frame's JSON object, or None when it is not one (bounded, never raises)."""
    if len(payload) > MAX_CONTROL_BYTES:
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if type(data) is dict else None


def curve(sock: Any, keys: Keypair, server: bool) -> None:
    """Makes ``sock`` a CurveZMQ server or client with this user's keypair; LINGER 0."""
    import zmq

    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    if server:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
    else:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.public)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # a dead link is noticed, and redialled
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(LINK_TIMEOUT * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)


def start(
    run_dir: Path, run: str, who: Identity, problems: Problems, file_mode: int
) -> Relay | Aggregator | None:
    """The relay (local rank 0 of another node) or aggregator (global rank 0) of a launch that
    spans nodes; None otherwise, or when ``LMTOP_RELAY=0``. Never raises."""
    try:
        if os.environ.get("LMTOP_RELAY", "").strip().lower() in ("0", "off", "no", "false"):
            return None
        if not (who.launched and multi_node()) or (who.rank != 0 and who.local_rank != 0):
            return None
        master = os.environ.get("MASTER_ADDR", "").strip()
        if not master:
            problems("several nodes but no MASTER_ADDR: each node keeps its own run files")
            return None
        from .keys import load

        keys = load()
        if who.rank == 0:
            from .aggregator import Aggregator

            def endpoint() -> str:  # in the aggregator's thread: it may wait on DNS
                return tcp(bind_address(master), port())

            aggregator = Aggregator(
                run_dir, run, who.launch, endpoint, keys, problems, file_mode, who.world
            )
            aggregator.expected = nodes() - 1
            return aggregator
        if node_rank() < 1:
            problems(
                "several nodes but this node's rank is unknown (GROUP_RANK, NODE_RANK): "
                "it keeps its own run files"
            )
            return None
        return Relay(run_dir, who.launch, node_rank(), tcp(master, port()), keys, problems)
    except Exception as exc:
        problems("the relay to node 0 is off; each node keeps its own run files", repr(exc)[:200])
        return None


def drain(zmq: Any, sock: Any, limit: int = 1000) -> Iterator[list[bytes]]:
    """The messages waiting on ``sock``, at most ``limit``; asks ZMQ_EVENTS rather than letting
    the last receive raise ``Again`` (an exception costs more than a frame)."""
    for _ in range(limit):
        if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def _seq(line: bytes) -> tuple[int, str] | None:
    """The (seq, kind) of one line of a rank file, or None for a line that is not a message."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict:
        return None
    seq, kind = data.get("seq"), data.get("kind")
    return (seq, str(kind)) if type(seq) is int else None


class RankTail:
    """One local rank file as the relay knows it: how far it goes, and where its seqs start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0  # bytes read, up to the last complete line
        self.last_seq = -1
        self.ended = False
        self._lines = 0
        self._index: list[tuple[int, int]] = []  # (seq, offset), every INDEX_EVERY lines

    def read(self) -> None:
        """Reads what the file gained since the last call (at most READ_BUDGET bytes)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(READ_BUDGET)
        end = data.rfind(b"\n") + 1
        position = self.offset
        for line in data[:end].split(b"\n")[:-1]:
            got = _seq(line)
            if got is not None and got[0] > self.last_seq:
                if self._lines % INDEX_EVERY == 0:
                    self._index.append((got[0], position))
                self._lines += 1
                self.last_seq = got[0]
                self.ended = self.ended or got[1] == schema.END
            position += len(line) + 1
        self.offset += end

    def lines_from(self, seq: int, limit: int = FILL_BYTES) -> bytes:
        """The file's lines from ``seq`` on, about ``limit`` bytes of them, as read so far."""
        at = bisect.bisect_right(self._index, (seq, 1 << 64)) - 1
        position = self._index[at][1] if at >= 0 else 0
        out: list[bytes] = []
        size = 0
        with open(self.path, "rb") as f:
            f.seek(position)
            while position < self.offset and size < limit:
                line = f.readline()
                if not line:
                    break
                position += len(line)
                got = _seq(line)
                if got is not None and got[0] >= seq:
                    out.append(line if line.endswith(b"\n") else line + b"\n")
                    size += len(line)
        return b"".join(out)


class Relay:
    """Forwards this node's ranks to the aggregator in global rank 0; a thread of local rank 0.

    Never blocks the training: frames that cannot be sent at once are dropped and counted, and
    sent again from the files when the aggregator asks for them.
    """

    def __init__(
        self,
        run_dir: Path,
        launch: str,
        node: int,
        endpoint: str,
        keys: Keypair,
        problems: Problems,
    ) -> None:
        self.run_dir = run_dir
        self.launch = launch
        self.node = node
        self.endpoint = endpoint
        self.dropped = 0  # live frames not sent (the link down or slow)
        self.shared = False  # node 0 sees this node's run directory: nothing to relay
        self._keys = keys
        self._problems = problems
        self._nonce = secrets.token_hex(16)
        self._write_nonce()
        self._tails: dict[int, RankTail] = {}
        self._pids: dict[int, tuple[int, int | None]] = {}  # local rank -> (pid, start ticks)
        self._acked: dict[int, int] = {}  # rank -> the next seq node 0 wants
        self._heard = 0.0  # when node 0 last answered (monotonic), 0 before it ever did
        self._deadline = self._stopped_at = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="lmtop-relay", daemon=True)
        self._thread.start()

    def close(self, seconds: float | None = None) -> None:
        """Sends what node 0 still lacks, for at most ``seconds`` (default :func:`grace`) while
        the link is up."""
        seconds = grace() if seconds is None else seconds
        self._stopped_at = time.monotonic()
        self._deadline = self._stopped_at + seconds
        self._stopping.set()
        self._thread.join(seconds + 0.2)

    def _write_nonce(self) -> None:
        # Node 0 reads it back when the two nodes share the run directory.
        path = self.run_dir / f".node-{self.node}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, self._nonce.encode())
        finally:
            os.close(fd)

    def _main(self) -> None:
        import zmq

        context = zmq.Context(io_threads=1)
        try:
            self._run(zmq, context)
        except Exception as exc:
            self._problems("the relay to node 0 stopped; this node's files are complete", exc)
        finally:
            context.destroy(linger=0)

    def _run(self, zmq: Any, context: Any) -> None:
        link = context.socket(zmq.DEALER)
        curve(link, self._keys, server=False)
        link.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues for a link that is down
        link.setsockopt(zmq.SNDHWM, SEND_HWM)
        link.setsockopt(zmq.RECONNECT_IVL, 100)
        link.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # The moment the link is up (again), say hello: node 0 asks for what it missed meanwhile.
        up = link.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        link.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(link, zmq.POLLIN)
        poller.register(up, zmq.POLLIN)
        subs: dict[str, Any] = {}
        next_hello = 0.0
        started = time.monotonic()
        while not self.shared:
            now = time.monotonic()
            stopping = self._stopping.is_set()
            if now >= next_hello:
                if not self._heard and started and now - started > NEVER_UP_SECONDS:
                    started = 0.0  # said once
                    self._problems("node 0 never answered; its copy lacks this node", self.endpoint)
                self._discover(zmq, context, poller, subs)
                self._send(zmq, link, HELLO, self._hello())
                next_hello = now + (0.05 if stopping else HELLO_SECONDS)
            # At the end: until node 0 has everything, for grace() at most; not at all once the
            # link is known to be down, and a second at most when it never came up.
            if self._heard:
                down = now - self._heard > LINK_TIMEOUT
            else:
                down = now > self._stopped_at + UNSEEN_GRACE
            if stopping and (self._complete() or now > self._deadline or down):
                return
            wait = max(0.0, min(next_hello - now, 0.1))
            ready = poller.poll(int(wait * 1000) + 1)
            batch: list[bytes] = []  # every rank's frames of this turn go as one
            size = 0
            for turn in (0, 1):
                for sock, _ in ready:
                    for frames in drain(zmq, sock):
                        if sock is link:
                            self._answer(zmq, link, frames)
                        elif sock is up:
                            next_hello = 0.0
                        else:
                            batch.append(frames[0])
                            size += len(frames[0])
                            if size > FILL_BYTES:
                                self._send(zmq, link, LINES, b"".join(batch))
                                batch, size = [], 0
                if turn or not batch:
                    break
                # The node's other ranks publish the same step a few ms apart: one frame for
                # them all costs node 0 one wake-up instead of one per rank.
                time.sleep(COALESCE_SECONDS)
                ready = poller.poll(0)
            if batch:
                self._send(zmq, link, LINES, b"".join(batch))

    def _discover(self, zmq: Any, context: Any, poller: Any, subs: dict[str, Any]) -> None:
        """Subscribes to this node's live ranks of the run; reads how far their files go."""
        mine = str(self.run_dir)
        listed = set()
        for entry in registry.live_entries():
            endpoint = str(entry["endpoint"])
            if entry["dir"] != mine or not endpoint.startswith("ipc://"):
                continue
            listed.add(endpoint)
            self._pids[entry["rank"]] = (entry["pid"], entry.get("start_ticks"))
            if endpoint in subs or "ended" in entry:
                continue
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 100_000)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(endpoint)
            poller.register(sub, zmq.POLLIN)
            subs[endpoint] = sub
        # A rank's entry leaves the registry a minute after its end (all it sent long drained):
        # its socket goes too, rather than reconnecting to a dead path for the job's life.
        for endpoint in [e for e in subs if e not in listed]:
            poller.unregister(subs[endpoint])
            subs.pop(endpoint).close()
        for path in self.run_dir.iterdir():
            match = schema.RANK_FILE.match(path.name)
            if match is not None and int(match[1]) not in self._tails:
                self._tails[int(match[1])] = RankTail(path)
        for tail in self._tails.values():
            if not tail.ended or tail.offset < tail.path.stat().st_size:
                tail.read()

    def _hello(self) -> bytes:
        return orjson.dumps(
            {
                "launch": self.launch,
                "node": self.node,
                "nonce": self._nonce,
                "have": {str(r): t.last_seq for r, t in self._tails.items()},
                "done": [r for r, t in self._tails.items() if self._done(r, t)],
            }
        )

    def _done(self, rank: int, tail: RankTail) -> bool:
        """Whether a local rank will write nothing more: it ended, or its process is gone."""
        if tail.ended:
            return True
        pid = self._pids.get(rank)
        return pid is not None and not registry.pid_alive(*pid)

    def _complete(self) -> bool:
        """Whether every local rank is done and node 0 has all of it."""
        return bool(self._tails) and all(
            self._acked.get(r, 0) > t.last_seq and self._done(r, t) for r, t in self._tails.items()
        )

    def _send(self, zmq: Any, link: Any, kind: bytes, payload: bytes) -> None:
        try:
            link.send_multipart([kind, payload], zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            if self._heard:  # before the link first comes up, dropping is the plan, not news
                self._problems(
                    "live lines for node 0 dropped (link down or slow; sent from the files later)"
                )

    def _answer(self, zmq: Any, link: Any, frames: list[bytes]) -> None:
        data = control(frames[1]) if len(frames) == 2 else None
        if data is None:
            return
        self._heard = time.monotonic()
        if frames[0] == ACK:
            acked = data.get("acked")
            if type(acked) is dict:
                for rank, seq in acked.items():
                    if rank.isdigit() and type(seq) is int:
                        self._acked[int(rank)] = seq
            self.shared = data.get("shared") is True
        elif frames[0] == WANT:
            rank, start = data.get("rank"), data.get("from")
            tail = self._tails.get(rank) if type(rank) is int else None
            if tail is not None and type(start) is int:
                tail.read()  # all that is on disk now, not as of the last look
                lines = tail.lines_from(start)
                if lines:
                    self._send(zmq, link, LINES, lines)
