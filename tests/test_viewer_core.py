"""The viewer core survives anything in a file or on the wire, and notices what comes later."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from lmtop.hooks import registry, schema
from lmtop.tui import follow
from lmtop.tui.follow import Follower
from lmtop.tui.runfile import RankFile

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
garbage_line = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "v": st.sampled_from([1, 2, "1"]),
            "run": json_values,
            "rank": json_values,
            "seq": json_values,
        }
    ).map(lambda v: json.dumps(v).encode()),
)


def message(
    run: str, rank: int, seq: int, kind: str = "metrics", step: int | None = None, **fields: object
) -> bytes:
    data = {
        "v": 1,
        "run": run,
        "rank": rank,
        "world": 1,
        "seq": seq,
        "t": 1.0,
        "kind": kind,
        "step": step,
    }
    if kind == "metrics":
        data["m"] = {"loss": float(seq)}
    data.update(fields)
    return schema.encode(data)


def read_all(*paths: str, follow: bool = False) -> tuple[Follower, list[schema.Message]]:
    follower = Follower(list(paths), follow=follow, live=False)
    out: list[schema.Message] = []
    for _ in range(20):
        out += [m for _, m in follower.poll(0)]
        if follower.done:
            break
    return follower, out


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(garbage_line, max_size=12), where=st.integers(0, 3))
def test_garbage_lines_in_a_file_are_skipped_and_counted(
    tmp_path: Path, lines: list[bytes], where: int
) -> None:
    assume(not any(_is_message(line) for line in lines))
    run_dir = tmp_path / f"run-{time.monotonic_ns()}"
    run_dir.mkdir()
    good = [message("r", 0, seq, step=seq) for seq in range(4)]
    content = [*good[:where], *(line + b"\n" for line in lines), *good[where:]]
    (run_dir / "rank-0.jsonl").write_bytes(b"".join(content))
    follower, out = read_all(str(run_dir))
    assert [m.seq for m in out] == [0, 1, 2, 3]
    (run,) = follower.book.snapshot()
    assert run.bad_lines == sum(1 for line in lines if line.strip())


def _is_message(line: bytes) -> bool:
    try:
        schema.decode(line)
    except schema.BadMessage:
        return False
    return True


def test_a_partial_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.jsonl"
    whole = message("r", 0, 0, step=0) + message("r", 0, 1, step=1)
    path.write_bytes(whole[:-20])
    reader = RankFile(path, 0)
    first, _ = reader.read()
    assert [m.seq for m in first] == [0] and reader.bad_lines == 0 and reader.has_partial
    with path.open("ab") as f:
        f.write(whole[-20:])
    second, _ = reader.read()
    assert [m.seq for m in second] == [1] and reader.bad_lines == 0


def test_a_huge_line_without_newline_is_dropped_and_reading_resumes(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.jsonl"
    path.write_bytes(b"x" * (3 * schema.MAX_MESSAGE_BYTES) + b"\n" + message("r", 0, 5, step=5))
    reader = RankFile(path, 0)
    got = []
    for _ in range(10):
        got += reader.read(limit=50_000)[0]
    assert [m.seq for m in got] == [5] and reader.bad_lines == 1


def test_another_protocol_version_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.jsonl"
    path.write_bytes(orjson.dumps({"v": 2, "run": "r", "rank": 0}) + b"\n")
    reader = RankFile(path, 0)
    assert reader.read()[0] == [] and reader.bad_lines == 1
    assert reader.unsupported is not None and "v2" in reader.unsupported


def test_non_finite_values_and_ten_thousand_metric_names(tmp_path: Path) -> None:
    run_dir = tmp_path / "wide"
    run_dir.mkdir()
    metrics = {f"metric_{i}": float(i) for i in range(100_000)}
    metrics.update({"nan": "NaN", "inf": "Infinity", "bad": "hello", "list": [1]})  # type: ignore[dict-item]
    line = orjson.dumps(
        {
            "v": 1,
            "run": "wide",
            "rank": 0,
            "world": 1,
            "seq": 0,
            "t": 1.0,
            "kind": "metrics",
            "step": 0,
            "m": metrics,
        }
    )
    (run_dir / "rank-0.jsonl").write_bytes(line + b"\n")
    _, out = read_all(str(run_dir))
    (m,) = out
    assert len(m.m) == 100_002 and m.m["inf"] == float("inf") and m.m["nan"] != m.m["nan"]


def test_ranks_and_runs_that_appear_later_are_noticed(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    follower = Follower([str(folder)], follow=True, live=False)
    assert follower.poll(0) == []
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "rank-0.jsonl").write_bytes(message("a", 0, 0, step=0))
    time.sleep(1.1)  # folders are searched about once a second
    assert [(m.run, m.rank) for _, m in follower.poll(0)] == [("a", 0)]
    (folder / "a" / "rank-1.jsonl").write_bytes(message("a", 1, 0, step=0))
    (folder / "b").mkdir()
    (folder / "b" / "rank-0.jsonl").write_bytes(message("b", 0, 0, step=0))
    time.sleep(1.1)
    assert sorted((m.run, m.rank) for _, m in follower.poll(0)) == [("a", 1), ("b", 0)]
    follower.close()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames=st.lists(st.one_of(garbage_line, st.binary(max_size=2000)), min_size=1, max_size=8))
def test_garbage_on_the_live_socket_is_counted_and_the_stream_goes_on(
    tmp_path: Path, lmtop_env: dict[str, str], frames: list[bytes]
) -> None:
    runtime = registry.runtime_dir()
    name = f"g{time.monotonic_ns() % 10**9}"
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "rank-0.jsonl").write_bytes(
        message(name, 0, 0, kind="start", info={"pid": os.getpid()})
    )
    endpoint = f"ipc://{runtime}/{name}.sock"
    context = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    entry = registry.register(
        {"pid": os.getpid(), "run": name, "rank": 0, "dir": str(run_dir), "endpoint": endpoint}
    )
    follower = Follower([str(run_dir)])
    try:
        assert [m.seq for _, m in follower.poll(0)] == [0]
        seq = 1
        deadline = time.monotonic() + 10
        while True:  # the slow joiner: publish until the subscription has arrived
            pub.send(message(name, 0, seq, step=seq))
            got = follower.poll(0.05)
            if got:
                break
            assert time.monotonic() < deadline
        for frame in frames:
            pub.send(frame)
        pub.send(message(name, 0, 10_000_000, step=7))
        arrived: list[schema.Message] = []
        while not arrived and time.monotonic() < deadline:
            arrived = [m for _, m in follower.poll(0.05) if m.step == 7]
        assert arrived, "a good message after garbage must still arrive"
        bad_lines = sum(
            1 for frame in frames for line in frame.split(b"\n") if line and not _is_message(line)
        )
        assert follower.bad_live == bad_lines
    finally:
        follower.close()
        pub.close(linger=0)
        registry.unregister(entry)


def test_a_finished_run_from_another_host_keeps_its_end_status(tmp_path: Path) -> None:
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    (run_dir / "rank-0.jsonl").write_bytes(
        message("elsewhere", 0, 0, kind="start", info={"host": "another-box", "pid": 1})
        + message("elsewhere", 0, 1, step=0)
        + message("elsewhere", 0, 2, kind="end", step=0, status="ok")
    )
    follower, out = read_all(str(run_dir), follow=True)
    (run,) = follower.book.snapshot()
    assert len(out) == 3 and run.ranks[0].status == "ok" and run.state == "finished"


def test_a_long_history_reads_as_catching_up_from_the_other_thread_too(tmp_path: Path) -> None:
    # The app's thread asks `catching_up` while the receiving thread is inside a poll; a
    # moment of False there let partial frames through that slowed the first frame by 0.1 s.
    run = tmp_path / "long"
    run.mkdir()
    lines = [message("long", 0, 0, kind="start")]
    lines += [message("long", 0, seq, step=seq, pad="x" * 200) for seq in range(1, 60_000)]
    (run / "rank-0.jsonl").write_bytes(b"".join(lines))  # ~17 MB: several read chunks
    follower = Follower([str(run)], follow=False, live=False)
    seen_during_reads: list[bool] = []
    read = follower._read

    def watched_read(*args: object) -> bool:
        seen_during_reads.append(follower.catching_up)
        return read(*args)  # type: ignore[arg-type]

    follower._read = watched_read  # type: ignore[method-assign]
    got = follower.poll(0)
    while follower.catching_up:
        got += follower.poll(0)
    assert len(got) == 60_000
    assert len(seen_during_reads) >= 4
    assert all(seen_during_reads[1:]), seen_during_reads  # the first read starts the backlog


def _follow_demo_ranks(
    lmtop_env: dict[str, str], ranks: int, seconds: float
) -> tuple[Follower, dict[int, int], list[Any]]:
    """Follows ``ranks`` of ``lmtop demo``'s simulated ranks (40 steps a second each, through
    the real hook) live for ``seconds``; returns the follower, each rank's last seq in its file
    when it stopped, and the processes (stopped)."""
    from lmtop.tui.demo import start_ranks, stop

    procs = start_ranks(ranks, 10_000_000, 1.0, lmtop_env["LMTOP_DIR"])
    follower = Follower()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            follower.poll(0.1)
        written = {}
        for run in follower.runs.values():
            for number in run.ranks:
                assert run.dir is not None
                last = (run.dir / f"rank-{number}.jsonl").read_bytes().rsplit(b"\n", 2)[-2]
                written[number] = orjson.loads(last)["seq"]
    finally:
        stop(procs)
    return follower, written, procs


def test_a_rank_heard_live_still_has_its_file_read_and_its_process_checked(
    lmtop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a rank's frames keep coming, its file is still read (for a frame the live path
    lost) and its process checked (for a crash) every 1-2 s: a frame must not put the read off
    for ever (then a pause read everything written since the viewer started at once)."""
    checked: list[int] = []
    check = Follower._check_alive

    def counting(self: Follower, run: Any, rank: Any, out: Any, now: float) -> None:
        checked.append(rank.rank)
        check(self, run, rank, out, now)

    monkeypatch.setattr(Follower, "_check_alive", counting)
    follower, _, _ = _follow_demo_ranks(lmtop_env, 2, 8.0)
    follower.close()
    # Every 1-2 s: 4-7 times here once the ranks run; only at the first scan before.
    assert checked.count(0) >= 2 and checked.count(1) >= 2


def test_live_frames_beyond_one_polls_limit_are_taken_and_none_is_dropped(
    lmtop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll takes at most LIVE_DRAIN_FRAMES frames; when more wait (thousands of ranks), the
    next polls take them at once instead of gathering again, so the sockets' queues do not
    grow; and every frame taken from a socket is applied (the one taken last was dropped)."""
    monkeypatch.setattr(follow, "LIVE_DRAIN_FRAMES", 2)  # 4 ranks x 40 frames/s is then a lot
    received: list[bytes] = []
    applied: list[bytes] = []
    receive, apply = follow._LiveSockets.receive, Follower._apply_frame

    def receiving(self: Any, wait: float) -> Any:
        got = receive(self, wait)
        if got is not None:
            received.append(got[1])
        return got

    def applying(self: Follower, key: str, number: int, frame: bytes, out: Any) -> None:
        applied.append(frame)
        apply(self, key, number, frame, out)

    monkeypatch.setattr(follow._LiveSockets, "receive", receiving)
    monkeypatch.setattr(Follower, "_apply_frame", applying)
    follower, written, _ = _follow_demo_ranks(lmtop_env, 4, 6.0)
    follower.close()
    lines = sum(frame.count(b"\n") + 1 for frame in received)
    assert applied == received
    assert lines >= 0.8 * sum(written.values()), (lines, written)  # taken as fast as sent
