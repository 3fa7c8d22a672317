"""Several nodes sharing a run directory: one run, every rank followed whatever its host.

Two "nodes" are two torchrun launches on this machine (--nnodes 2, node ranks 0 and 1, a
static rendezvous on 127.0.0.1), each with its own runtime directory, writing to one LMTOP_DIR
as nodes with a shared filesystem do; the relay over TCP sees that and stands down. The relay
without a shared filesystem is tested in test_relay.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from lmtop.hooks import schema
from lmtop.tui.follow import REMOTE_SILENT_SECONDS, Follower
from runs import line

SCRIPT = Path(__file__).parent / "scripts" / "publish_steps.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_on_a_shared_directory_make_one_run_named_alike_without_lmtop_run(
    tmp_path: Path, lmtop_env: dict[str, str]
) -> None:
    port, relay_port, steps = _free_port(), _free_port(), 200
    shared = tmp_path / "shared-runs"
    nodes, runtimes = [], []
    for node in (0, 1):  # each node's own private runtime directory, with a short path
        runtime = Path(tempfile.mkdtemp(prefix=f"ltn{node}", dir="/tmp"))
        runtimes.append(runtime)
        env = dict(
            os.environ,
            LMTOP_DIR=str(shared),
            LMTOP_RUNTIME_DIR=str(runtime),
            LMTOP_PORT=str(relay_port),
            XDG_CONFIG_HOME=str(tmp_path / "config"),  # one home: the relay's key
        )
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LMTOP_RUN"):
            env.pop(name, None)
        nodes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes",
                    "2",
                    "--node_rank",
                    str(node),
                    "--nproc_per_node",
                    "2",
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(port),
                    str(SCRIPT),
                    str(steps),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    errors = []
    try:
        for launcher in nodes:
            _, err = launcher.communicate(timeout=180)
            assert launcher.returncode == 0, err.decode()[-2000:]
            errors.append(err.decode())
    finally:
        for runtime in runtimes:
            shutil.rmtree(runtime, ignore_errors=True)
    (run_dir,) = [p for p in shared.iterdir() if p.is_dir()]
    assert sorted(p.name for p in run_dir.glob("rank-*.jsonl")) == [
        f"rank-{r}.jsonl" for r in range(4)
    ]
    follower = Follower([str(shared)], follow=False, live=False)
    got: list[schema.Message] = []
    while not follower.done:
        got += [m for _, m in follower.poll(0)]
    (run,) = follower.book.snapshot()
    assert run.world == 4 and run.state == "finished"
    for rank in range(4):
        assert [m.seq for m in got if m.rank == rank] == list(range(steps + 2))
    launches = {m.data["info"].get("launch") for m in got if m.kind == "start"}
    assert len(launches) == 1, "every rank of both nodes is one launch"
    # The relay saw the shared directory and stood down: nothing written twice, nothing refused.
    for rank in range(4):
        lines = (run_dir / f"rank-{rank}.jsonl").read_bytes().count(b"\n")
        assert lines == steps + 2
    assert "lmtop:" not in errors[0], errors[0][-2000:]


def test_a_rank_on_another_host_is_followed_as_its_file_grows(tmp_path: Path) -> None:
    # Before: a rank whose host was not this one was marked done after the first read, and
    # the steps it wrote afterwards were never shown.
    run_dir = tmp_path / "remote"
    run_dir.mkdir()
    now = time.time()
    start = line("remote", 1, 2, 0, "start", None, now, info={"host": "node-b", "pid": 4242})
    (run_dir / "rank-1.jsonl").write_bytes(start)
    follower = Follower([str(run_dir)], live=False)
    seen = [m.seq for _, m in follower.poll(0)]
    with (run_dir / "rank-1.jsonl").open("ab") as f:
        for seq in range(1, 11):
            f.write(line("remote", 1, 2, seq, "metrics", seq, now + seq, m={"loss": 1.0}))
    deadline = time.monotonic() + 10
    while len(seen) < 11 and time.monotonic() < deadline:
        seen += [m.seq for _, m in follower.poll(0.05)]
    (run,) = follower.book.snapshot()
    assert seen == list(range(11))
    assert run.ranks[0].status is None and run.state == "live"  # not crashed, not done
    follower.close()


def test_a_remote_rank_silent_for_long_is_given_up_as_unknown_not_crashed(tmp_path: Path) -> None:
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    then = time.time() - REMOTE_SILENT_SECONDS - 60  # its last line is older than the limit
    (run_dir / "rank-0.jsonl").write_bytes(
        line("stale", 0, 1, 0, "start", None, then, info={"host": "node-b", "pid": 4242})
        + line("stale", 0, 1, 1, "metrics", 0, then + 1, m={"loss": 1.0})
    )
    follower = Follower([str(run_dir)], live=False)
    deadline = time.monotonic() + 10
    while not follower.done and time.monotonic() < deadline:
        follower.poll(0.05)
    (run,) = follower.book.snapshot()
    assert follower.done and run.ranks[0].status == "unknown" and run.state == "finished"
    follower.close()
