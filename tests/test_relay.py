"""Several nodes without a shared filesystem: every rank reaches node 0 over CurveZMQ TCP.

Two "nodes" are two torchrun launches on this machine (--nnodes 2, node ranks 0 and 1), each
with its own LMTOP_DIR and runtime directory and one shared home (the key), the relay's TCP on
127.0.0.1. Node 0's runtime directory is the test's own, so the viewer here is a viewer on node 0.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import zmq
from lmtop import hooks
from lmtop.hooks import keys, schema
from lmtop.hooks.aggregator import Aggregator
from lmtop.hooks.keys import Keypair
from lmtop.hooks.publisher import Problems
from lmtop.hooks.relay import HELLO, LINES
from lmtop.tui.follow import Follower
from runs import line

SCRIPT = Path(__file__).parent / "scripts" / "publish_steps.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listeners(pid: int | str = "self") -> set[tuple[str, int]]:
    """The TCP (address, port) pairs process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                address, port = fields[1].split(":")
                ip = socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else "::"
                found.add((ip, int(port, 16)))
    return found


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home shared by both nodes: where the user's key is made on first use."""
    config = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    monkeypatch.delenv("LMTOP_CURVE_SECRET", raising=False)
    return config


class Nodes:
    """Two torchrun launches that make one job of 2 nodes x 2 ranks."""

    def __init__(self, tmp_path: Path, node0_runtime: str, steps: int, *args: str) -> None:
        self.master_port = _free_port()
        self.port = _free_port()  # the aggregator's
        self.dirs = [tmp_path / "node0", tmp_path / "node1"]
        self.runtimes = [node0_runtime, tempfile.mkdtemp(prefix="ltn1", dir="/tmp")]
        self.steps = steps
        self.args = args
        self.launchers: list[subprocess.Popen[bytes]] = []

    def start(self, node1_port: int | None = None) -> None:
        for node in (0, 1):
            port = self.port if node == 0 else node1_port or self.port
            env = dict(
                os.environ,
                LMTOP_DIR=str(self.dirs[node]),
                LMTOP_RUNTIME_DIR=self.runtimes[node],
                LMTOP_PORT=str(port),
            )
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
            command += ["--node_rank", str(node), "--nproc_per_node", "2"]
            command += ["--master_addr", "127.0.0.1", "--master_port", str(self.master_port)]
            command += [str(SCRIPT), str(self.steps), *self.args]
            self.launchers.append(
                subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            )

    def wait(self) -> None:
        for launcher in self.launchers:
            _, err = launcher.communicate(timeout=120)
            assert launcher.returncode == 0, err.decode()[-2000:]

    def run_dir(self, node: int) -> Path:
        (run_dir,) = [p for p in self.dirs[node].iterdir() if p.is_dir()]
        return run_dir

    def lines(self, node: int, rank: int) -> int:
        try:
            return (self.run_dir(node) / schema.rank_file(rank)).read_bytes().count(b"\n")
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        for launcher in self.launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()


@pytest.fixture
def nodes(
    tmp_path: Path, lmtop_env: dict[str, str], home: Path
) -> Iterator[tuple[Nodes, Follower]]:
    """Two nodes, not started, and a viewer on node 0 started before them."""
    follower = Follower()
    made = Nodes(tmp_path, lmtop_env["LMTOP_RUNTIME_DIR"], 0)
    yield made, follower
    follower.close()
    made.close()


def _poll_until(
    follower: Follower,
    condition: Callable[[], bool],
    limit: float,
    each: Callable[[list[tuple[str, schema.Message]]], None] = lambda batch: None,
) -> None:
    """Polls the viewer until ``condition`` holds or ``limit`` seconds pass, handing each
    batch to ``each``."""
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        each(follower.poll(0.05))


def _follow(follower: Follower, seen: dict[int, list[int]], until: float = 120) -> None:
    deadline = time.monotonic() + until
    while not follower.done and time.monotonic() < deadline:
        for _, message in follower.poll(0.05):
            seen.setdefault(message.rank, []).append(message.seq)


def _assert_complete(made: Nodes, seen: dict[int, list[int]]) -> None:
    """Node 0 holds all 4 ranks, its copies of node 1's equal to node 1's own files, and the
    viewer on node 0 showed every message of every rank once."""
    run_dir = made.run_dir(0)
    assert sorted(p.name for p in run_dir.glob("rank-*.jsonl")) == [
        f"rank-{r}.jsonl" for r in range(4)
    ]
    for rank in (2, 3):
        name = schema.rank_file(rank)
        assert (run_dir / name).read_bytes() == (made.run_dir(1) / name).read_bytes()
    assert {rank: seqs for rank, seqs in seen.items()} == {
        rank: list(range(made.steps + 2)) for rank in range(4)
    }
    later = Follower([str(run_dir)], follow=False, live=False)  # a viewer started after
    while not later.done:
        later.poll(0)
    (run,) = later.book.snapshot()
    assert run.state == "finished" and [r.messages for r in run.ranks] == [made.steps + 2] * 4


@pytest.mark.slow
def test_every_rank_of_both_nodes_reaches_node_0_once_over_curve(
    nodes: tuple[Nodes, Follower],
) -> None:
    made, follower = nodes
    made.steps, made.args = 300, ("--pace-every", "20", "--pace", "0.1")
    made.start()
    seen: dict[int, list[int]] = {}
    seen_during: dict[int, list[int]] = {}
    during: Follower | None = None  # a second viewer, started mid-run
    listening: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 120
    while not follower.done and time.monotonic() < deadline:
        for _, message in follower.poll(0.05):
            seen.setdefault(message.rank, []).append(message.seq)
        if during is None and made.lines(0, 3) > 50:
            during = Follower()
        if during is not None and not during.done:
            for _, message in during.poll(0):
                seen_during.setdefault(message.rank, []).append(message.seq)
        for pid in {r.pid for run in follower.runs.values() for r in run.ranks.values()}:
            try:
                listening |= {(ip, port) for ip, port in _listeners(pid) if port == made.port}
            except (OSError, TypeError):
                pass
    made.wait()
    assert during is not None
    while not during.done and time.monotonic() < deadline:
        for _, message in during.poll(0.05):
            seen_during.setdefault(message.rank, []).append(message.seq)
    during.close()
    assert seen_during == seen
    _assert_complete(made, seen)
    # One port, on the interface that reaches MASTER_ADDR (here the loopback), nowhere else.
    assert listening == {("127.0.0.1", made.port)}


class Proxy:
    """A TCP proxy between node 1's relay and node 0: a network link that can be cut."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        assert self._listener is not None
        for sock in [self._listener, *self._sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # node 0 is not listening yet: the relay dials again
                client.close()
                continue
            self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass


@pytest.mark.slow
def test_a_link_cut_mid_run_leaves_node_1_training_and_node_0_complete_once_it_returns(
    nodes: tuple[Nodes, Follower],
) -> None:
    made, follower = nodes
    made.steps, made.args = 600, ("--pace-every", "10", "--pace", "0.15")  # ~9 s
    proxy = Proxy(_free_port(), made.port)
    proxy.up()
    made.start(node1_port=proxy.port)
    seen: dict[int, list[int]] = {}

    def keep(batch: list[tuple[str, schema.Message]]) -> None:
        for _, message in batch:
            seen.setdefault(message.rank, []).append(message.seq)

    def poll_until(condition: Callable[[], bool], limit: float) -> None:
        _poll_until(follower, condition, limit, keep)

    poll_until(lambda: made.lines(0, 2) > 20, 60)  # node 1 relayed to node 0
    proxy.cut()
    at_cut = made.lines(1, 2)

    def unreachable() -> bool:
        return any(
            {r.rank: r.health for r in run.ranks}.get(2) == "unreachable"
            for run in follower.book.snapshot()
        )

    poll_until(unreachable, 20)
    assert unreachable(), "node 1's ranks are shown out of reach, not silent or crashed"
    during = made.lines(1, 2)
    proxy.up()
    _follow(follower, seen)
    made.wait()
    assert during > at_cut, "node 1 kept training while its link was down"
    # What the relay could not send it dropped and counted, in its rank's end message.
    end = orjson.loads((made.run_dir(1) / schema.rank_file(2)).read_bytes().splitlines()[-1])
    assert any("dropped" in kind for kind in end["problems"])
    (run,) = follower.book.snapshot()
    assert {r.health for r in run.ranks} == {"ok"}
    _assert_complete(made, seen)


def _client(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, **curve: bytes) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 60_000)  # one try each: the count is exact
    for option, value in curve.items():
        sock.setsockopt(getattr(zmq, option.upper()), value)
    sock.connect(endpoint)
    return sock


def test_clients_without_the_key_or_without_encryption_are_rejected_counted_and_never_read(
    tmp_path: Path,
) -> None:
    public, secret = zmq.curve_keypair()
    ours = Keypair(public, secret)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    problems = Problems()
    aggregator = Aggregator(run_dir, "run", "launch1", endpoint, ours, problems)
    assert aggregator.ready.wait(10)
    hello = b'{"launch": "launch1", "node": 1, "nonce": "n", "have": {"%d": 0}}'
    context = zmq.Context()
    other_public, other_secret = zmq.curve_keypair()
    intruders = [
        _client(context, endpoint),  # no encryption
        _client(  # its own key
            context,
            endpoint,
            curve_serverkey=public,
            curve_publickey=other_public,
            curve_secretkey=other_secret,
        ),
        _client(  # not even the server's public key
            context,
            endpoint,
            curve_serverkey=other_public,
            curve_publickey=other_public,
            curve_secretkey=other_secret,
        ),
    ]
    for sock in intruders:
        sock.send_multipart([HELLO, hello % 6])
        sock.send_multipart([LINES, line("x", 6, 8, 0, "start", None, time.time(), info={})])
    member = _client(
        context, endpoint, curve_serverkey=public, curve_publickey=public, curve_secretkey=secret
    )
    member.send_multipart([HELLO, hello % 5])
    member.send_multipart([LINES, line("x", 5, 8, 0, "start", None, time.time(), info={})])
    deadline = time.monotonic() + 20
    while (aggregator.rejected < 3 or aggregator.written < 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    aggregator.close(0)
    context.destroy(linger=0)
    assert aggregator.rejected == 3
    assert any("rejected" in kind for kind in problems.counts)  # said on stderr, and counted
    assert sorted(p.name for p in run_dir.iterdir()) == ["rank-5.jsonl"]  # nothing injected


@pytest.mark.parametrize("nodes_in_launch", [1, 2])
def test_only_a_launch_over_several_nodes_listens_on_tcp(
    nodes_in_launch: int, monkeypatch: pytest.MonkeyPatch, home: Path, fresh_hooks: None
) -> None:
    port = _free_port()
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    env |= {"GROUP_WORLD_SIZE": str(nodes_in_launch), "GROUP_RANK": "0"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "LMTOP_PORT": str(port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = _listeners()
    hooks.init()
    publisher = hooks.current()
    assert publisher is not None
    aggregator = publisher._relay
    if isinstance(aggregator, Aggregator):
        aggregator.ready.wait(10)
    else:
        time.sleep(0.5)  # a listener bound by some thread a moment later would show by now
    opened = _listeners() - before
    hooks.finish()
    assert opened == ({("127.0.0.1", port)} if nodes_in_launch > 1 else set())


def test_the_key_is_made_once_private_and_refused_when_others_may_read_it(home: Path) -> None:
    first = keys.load()
    path = home / "lmtop" / "curve.key"
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert keys.load() == first and zmq.curve_public(first.secret) == first.public
    path.chmod(0o640)
    with pytest.raises(keys.UnsafeKey):
        keys.load()


def _kill_midway(made: Nodes, follower: Follower, node: int, rank: int) -> None:
    """Starts a ~9 s job and kills ``rank`` (on ``node``) with -9 once node 0 holds some of
    each of node 1's ranks' lines (a rank of a loaded machine may start a second later)."""
    made.steps, made.args = 600, ("--pace-every", "10", "--pace", "0.15")
    made.start()
    _poll_until(follower, lambda: min(made.lines(0, 2), made.lines(0, 3)) > 20, 60)
    first = (made.run_dir(node) / schema.rank_file(rank)).read_bytes().splitlines()[0]
    os.kill(orjson.loads(first)["info"]["pid"], 9)


@pytest.mark.slow
def test_kill_9_of_node_1s_relay_rank_blocks_nothing_on_node_0_and_corrupts_nothing(
    nodes: tuple[Nodes, Follower],
) -> None:
    # Node 1's local rank 0 carries the relay: killed with -9, node 0 trains on to its end, its
    # copy of node 1's ranks is what was relayed (a prefix of node 1's own files: nothing
    # corrupt, nothing invented) and node 1's ranks are shown out of reach, never crashed.
    made, follower = nodes
    healths: set[str] = set()

    def note(batch: object) -> None:
        for run in follower.book.snapshot():
            healths.update(r.health for r in run.ranks if r.rank >= 2)

    def node_0_ended() -> bool:  # its ranks' end lines are written: they trained to the end
        return all(made.lines(0, rank) == made.steps + 2 for rank in (0, 1))

    _kill_midway(made, follower, node=1, rank=2)
    _poll_until(follower, node_0_ended, 60, note)
    assert node_0_ended(), "node 0 trained on to its end"
    # (torchrun's agent on node 0 then waits at its exit barrier for node 1's, up to 5 min: the
    # launcher, not lmtop; the fixture ends it.) Node 0's registry still says node 1 is out of
    # reach a while later.
    _poll_until(follower, lambda: False, 5, note)
    assert "unreachable" in healths and "crashed" not in healths, healths
    for rank in (2, 3):
        name = schema.rank_file(rank)
        copy, own = (made.run_dir(0) / name).read_bytes(), (made.run_dir(1) / name).read_bytes()
        assert copy and own.startswith(copy), f"rank {rank}: node 0's copy is a prefix of its own"
    for rank in (0, 1):
        lines = (made.run_dir(0) / schema.rank_file(rank)).read_bytes().splitlines()
        assert orjson.loads(lines[-1])["kind"] == "end"


@pytest.mark.slow
def test_kill_9_of_the_aggregator_rank_blocks_nothing_on_node_1(
    nodes: tuple[Nodes, Follower],
) -> None:
    # Global rank 0 carries the aggregator: killed with -9 mid-run, node 1's ranks train on to
    # their end (their relay drops and counts what it cannot send) and their own files are
    # complete. (A restarted rank 0 is a new launch, so a new run: nothing to fill in there.)
    made, follower = nodes
    _kill_midway(made, follower, node=0, rank=0)

    def node_1_ended() -> bool:
        return all(made.lines(1, rank) == made.steps + 2 for rank in (2, 3))

    _poll_until(follower, node_1_ended, 60)
    assert node_1_ended(), "node 1 trained on to its end, its files complete"
    end = orjson.loads((made.run_dir(1) / schema.rank_file(2)).read_bytes().splitlines()[-1])
    assert end["kind"] == "end" and any("dropped" in kind for kind in end["problems"])


def test_a_nodes_rank_comes_from_the_launcher_else_from_its_ranks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lmtop.hooks.relay import node_rank

    for name in ("GROUP_RANK", "SLURM_NODEID", "NODE_RANK", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert node_rank() == -1
    monkeypatch.setenv("RANK", "13")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert node_rank() == 1, "rank 13 of nodes of 8: the second node"
    monkeypatch.setenv("NODE_RANK", "3")
    assert node_rank() == 3, "the launcher's word first"


def test_a_line_missing_from_a_nodes_own_file_is_given_up_and_the_rank_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Node 1's file lacks seq 2 of rank 5 (its write failed there): node 0 asks for it, gets
    # what the file has from there (3 and 4) each time, and after a few asks gives 2 up,
    # counted, and writes on, where it used to hold the rank back for the rest of the run.
    from lmtop.hooks import aggregator as module

    monkeypatch.setattr(module, "ASK_AGAIN", 0.05)
    monkeypatch.setattr(module, "GIVE_UP_ASKS", 3)
    public, secret = zmq.curve_keypair()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    problems = Problems()
    aggregator = Aggregator(run_dir, "run", "launch1", endpoint, Keypair(public, secret), problems)
    assert aggregator.ready.wait(10)
    context = zmq.Context()
    member = _client(
        context, endpoint, curve_serverkey=public, curve_publickey=public, curve_secretkey=secret
    )
    hello = b'{"launch": "launch1", "node": 1, "nonce": "n", "have": {"5": 4}}'
    member.send_multipart([HELLO, hello])
    lines = {
        seq: line("x", 5, 8, seq, "metrics", seq, time.time(), m={"loss": 1.0}) for seq in range(5)
    }
    member.send_multipart([LINES, lines[0] + lines[1]])
    member.send_multipart([LINES, lines[3] + lines[4]])
    path = run_dir / "rank-5.jsonl"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        member.send_multipart([HELLO, hello])  # how far its file goes, as a relay says it
        if member.poll(50):
            kind, _ = member.recv_multipart()
            if kind == b"want":  # the file's lines from the wanted seq on: 2 is not there
                member.send_multipart([LINES, lines[3] + lines[4]])
        if path.exists() and path.read_bytes().count(b"\n") == 4:
            break
    aggregator.close(0)
    context.destroy(linger=0)
    written = [orjson.loads(raw)["seq"] for raw in path.read_bytes().splitlines()]
    assert written == [0, 1, 3, 4]
    assert any("missing" in kind for kind in problems.counts)


def test_a_relay_lets_go_of_a_rank_whose_entry_left_the_registry(tmp_path: Path) -> None:
    # A rank's registry entry goes a minute after its end: the relay's socket to it goes too,
    # not reconnecting to a dead ipc path for the rest of the job. Not an ipc endpoint: skipped.
    from lmtop.hooks import registry
    from lmtop.hooks.relay import Relay

    public, secret = zmq.curve_keypair()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    relay = Relay(
        run_dir, "l", 1, f"tcp://127.0.0.1:{_free_port()}", Keypair(public, secret), Problems()
    )
    runtime = registry.runtime_dir()
    entry: registry.Entry = {"pid": os.getpid(), "host": "h", "run": "r", "rank": 2, "world": 4}
    entry |= {"dir": str(run_dir), "endpoint": f"ipc://{runtime}/x.sock", "started": time.time()}
    path = registry.register(entry, "x")
    odd = registry.register({**entry, "rank": 3, "endpoint": "tcp://10.0.0.1:1"}, "y")
    context = zmq.Context()
    poller, subs = zmq.Poller(), {}
    try:
        relay._discover(zmq, context, poller, subs)
        assert list(subs) == [entry["endpoint"]]
        registry.unregister(path)
        relay._discover(zmq, context, poller, subs)
        assert subs == {}
    finally:
        registry.unregister(odd)
        relay.close(0)
        context.destroy(linger=0)
