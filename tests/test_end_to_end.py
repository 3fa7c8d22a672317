"""The data path end to end: real publisher processes, real sockets, real files, real viewers."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from conftest import launch, viewer
from lmtop.hooks import schema
from scripts.publish_steps import value

STEPS = 10_000
METRICS = 8


def _messages(output: bytes) -> list[schema.Message]:
    return [schema.decode(line) for line in output.splitlines()]


def _check_complete(messages: list[schema.Message], world: int, steps: int) -> None:
    """Every rank's start, every step exactly once and in order with its exact values, then end."""
    by_rank: dict[int, list[schema.Message]] = {}
    for message in messages:
        by_rank.setdefault(message.rank, []).append(message)
    assert sorted(by_rank) == list(range(world))
    assert len({m.run for m in messages}) == 1, "all ranks of one launch must join one run"
    for rank, own in by_rank.items():
        assert [m.seq for m in own] == list(range(steps + 2)), (
            f"rank {rank}: not exactly once, in order"
        )
        assert own[0].kind == "start" and own[-1].kind == "end"
        assert own[-1].data["status"] == "ok"
        metrics = own[1:-1]
        assert [m.step for m in metrics] == list(range(steps))
        for m in metrics:
            for i in range(METRICS):
                expected, got = value(rank, m.step or 0, i), m.m[f"metric_{i}"]
                assert got == expected or (math.isnan(expected) and math.isnan(got)), (
                    rank,
                    m.step,
                    i,
                )


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 8])
def test_viewers_before_during_and_after_see_every_message_once(
    world: int, lmtop_env: dict[str, str]
) -> None:
    # The data path alone: alert records (the steps hold NaN and Inf) are tested elsewhere.
    before = viewer("--no-alerts")  # this user's live runs; there are none yet
    time.sleep(0.5)
    ranks = [launch("publish_steps.py", str(STEPS), rank=r, world=world) for r in range(world)]
    # Start the second viewer once the ranks are well into the run.
    assert ranks[0].stdout is not None
    seen = b""
    while seen.count(b"\n") < STEPS // 3:
        chunk = ranks[0].stdout.read1(65536)  # type: ignore[attr-defined]
        assert chunk, ranks[0].stderr.read() if ranks[0].stderr else "rank 0 died"
        seen += chunk
    during = viewer("--no-alerts", lmtop_env["LMTOP_DIR"])
    for proc in ranks:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    after = viewer("--no-alerts", "--no-follow", lmtop_env["LMTOP_DIR"])
    for proc in (before, during, after):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        _check_complete(_messages(out), world, STEPS)


@pytest.mark.slow
def test_kill_9_loses_nothing_published_and_the_run_is_crashed(lmtop_env: dict[str, str]) -> None:
    during = viewer("--no-alerts", lmtop_env["LMTOP_DIR"])
    alerting = viewer(lmtop_env["LMTOP_DIR"])  # with alerts: the crash is a critical record
    steady = launch("publish_steps.py", "3000", rank=0, world=2)
    victim = launch(
        "publish_steps.py", "1000000", "--pace-every", "10", "--pace", "0.001", rank=1, world=2
    )
    assert victim.stdout is not None
    returned = b""
    while returned.count(b"\n") < 2000:
        returned += victim.stdout.read1(65536)  # type: ignore[attr-defined]
    victim.send_signal(signal.SIGKILL)
    returned += victim.stdout.read()
    victim.wait()
    last_returned = int(returned.split()[-1])
    steady.communicate(timeout=60)

    out, err = during.communicate(timeout=60)
    assert during.returncode == 0, err.decode()
    records = [orjson.loads(line) for line in alerting.communicate(timeout=60)[0].splitlines()]
    crashes = [r for r in records if r.get("kind") == "alert" and r["type"] == "crashed"]
    assert [(r["rank"], r["severity"]) for r in crashes] == [(1, "critical")]
    assert alerting.returncode == 2
    killed = [m for m in _messages(out) if m.rank == 1 and m.kind == "metrics"]
    assert [m.step for m in killed][: last_returned + 1] == list(range(last_returned + 1))

    rank_file = next(Path(lmtop_env["LMTOP_DIR"]).glob("*/rank-1.jsonl"))
    in_file = [
        orjson.loads(line)
        for line in rank_file.read_bytes().splitlines()[1:]
        if line.endswith(b"}")
    ]
    assert [m["step"] for m in in_file][: last_returned + 1] == list(range(last_returned + 1))

    from lmtop.tui.follow import Follower

    follower = Follower([lmtop_env["LMTOP_DIR"]])
    deadline = time.monotonic() + 10
    while not follower.done and time.monotonic() < deadline:
        follower.poll(0.1)
    follower.close()
    (run,) = follower.book.snapshot()
    assert run.state == "crashed"
    assert run.rank(1).status == "crashed" and run.rank(0).status == "ok"


@pytest.mark.parametrize("name", ["empty-folder", "does-not-exist"])
def test_a_path_with_nothing_to_read_says_so_and_fails(tmp_path: Path, name: str) -> None:
    if name == "empty-folder":
        (tmp_path / name).mkdir()
    proc = subprocess.run(
        [os.sys.executable, "-m", "lmtop.tui", "--headless", "--no-follow", str(tmp_path / name)],  # type: ignore[attr-defined]
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 1 and proc.stdout == b""
    reason = "no lmtop run" if name == "empty-folder" else "no such file or directory"
    assert reason in proc.stderr.decode() and name in proc.stderr.decode()
