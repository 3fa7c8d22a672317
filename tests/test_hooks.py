"""The hook's promises: it never blocks, never raises, never delays exit, and records truly."""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from conftest import SCRIPTS, viewer
from lmtop.hooks import schema


def scenario(
    *args: str, env: dict[str, str] | None = None, **popen: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "scenario.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
        **popen,
    )


def run_lines(folder: Path, rank: int = 0) -> list[dict[str, Any]]:
    (path,) = folder.glob(f"*/rank-{rank}.jsonl")
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def strict_json(line: bytes) -> Any:
    """json.loads without the NaN/Infinity extensions: what jq and RFC 8259 accept."""

    def refuse(name: str) -> None:
        raise ValueError(f"not RFC 8259: {name}")

    return json.loads(line, parse_constant=refuse)


def test_values_survive_the_round_trip_exactly_as_valid_json(lmtop_env: dict[str, str]) -> None:
    from lmtop import hooks

    values = {
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
        "tiny": 5e-324,
        "big": 1.7976931348623157e308,
        "third": 1 / 3,
        "int": 2**62,
        "bool": True,
    }
    hooks.init(run="roundtrip")
    hooks.publish(values, step=3)
    hooks.finish()
    lines = (Path(lmtop_env["LMTOP_DIR"]) / "roundtrip" / "rank-0.jsonl").read_bytes().splitlines()
    for line in lines:
        strict_json(line)
    message = schema.decode(lines[1])
    assert message.step == 3 and message.kind == "metrics"
    assert math.isnan(message.m["nan"])
    assert message.m["inf"] == math.inf and message.m["-inf"] == -math.inf
    assert message.m["tiny"] == 5e-324 and message.m["big"] == 1.7976931348623157e308
    assert message.m["third"] == 1 / 3 and message.m["int"] == 2**62 and message.m["bool"] == 1
    assert schema.decode(message.encode()).data == message.data


def test_start_message_describes_the_process(lmtop_env: dict[str, str]) -> None:
    from lmtop import hooks

    hooks.init(run="described", config={"lr": 3e-4, "model": object()})
    hooks.finish()
    start, end = run_lines(Path(lmtop_env["LMTOP_DIR"]))
    info = start["info"]
    assert start["kind"] == "start" and start["seq"] == 0
    assert info["pid"] == os.getpid() and info["world"] == 1 and info["rank"] == 0
    assert info["config"]["lr"] == 3e-4 and info["config"]["model"].startswith("<object")
    assert info["protocol"] == 1 and info["lmtop"] and info["host"] and info["argv"]
    assert end["kind"] == "end" and end["status"] == "ok" and end["seq"] == 1


def test_limits_drop_and_count_what_breaks_them(lmtop_env: dict[str, str]) -> None:
    from lmtop import hooks

    hooks.init(run="limits")
    hooks.publish({"n" * 201: 1.0, "kept": 1.0})
    hooks.publish({f"metric_{i}": float(i) for i in range(1500)})
    hooks.publish({f"{'k' * 190}{i:05d}": float(i) for i in range(900)})  # ~180 KiB encoded
    problems = hooks.stats()
    hooks.finish()
    lines = run_lines(Path(lmtop_env["LMTOP_DIR"]))
    assert lines[1]["m"] == {"kept": 1.0}
    assert len(lines[2]["m"]) == schema.MAX_METRICS
    assert [line["kind"] for line in lines] == ["start", "metrics", "metrics", "end"]
    assert [line["seq"] for line in lines] == [0, 1, 2, 3], "a dropped message must not leave a gap"
    assert len(problems) == 3, problems


def test_garbage_arguments_never_raise_and_are_reported_once(lmtop_env: dict[str, str]) -> None:
    result = scenario("garbage")
    assert result.returncode == 0, result.stderr
    problems = json.loads(result.stdout)["problems"]
    assert problems["metrics that are not numbers dropped"] >= 5
    assert all(line.count("(reported once") == 1 for line in result.stderr.splitlines())
    assert len(result.stderr.splitlines()) == len(problems)
    lines = run_lines(Path(lmtop_env["LMTOP_DIR"]))
    by_step = {line["step"]: line for line in lines if line["kind"] == "metrics"}
    assert by_step[100]["m"] == {"last": 1.0}
    assert any(line["m"] == {"nested/deeper/x": 1.0} for line in by_step.values())
    assert any(len(line["m"]) == schema.MAX_METRICS for line in by_step.values())
    assert lines[-1]["kind"] == "end" and lines[-1]["status"] == "ok"


def test_publish_without_any_viewer_records_everything(lmtop_env: dict[str, str]) -> None:
    result = scenario("loop", "5000")
    assert result.returncode == 0 and result.stderr == ""
    lines = run_lines(Path(lmtop_env["LMTOP_DIR"]))
    assert [line["step"] for line in lines[1:-1]] == list(range(5000))
    assert lines[-1]["status"] == "ok"


def _unwritable_dirs(tmp_path: Path) -> list[Path]:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    dirs = [a_file / "runs"]
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if os.geteuid() != 0:
        readonly.chmod(0o555)
        dirs.append(readonly)
    elif (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)]
        ).returncode
        == 0
    ):
        dirs.append(readonly)
    return dirs


def test_read_only_run_directory_leaves_the_loop_going(tmp_path: Path) -> None:
    for folder in _unwritable_dirs(tmp_path):
        try:
            result = scenario("loop", "2000", env={"LMTOP_DIR": str(folder)})
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["steps"] == 2000
            assert result.stderr.count("cannot write the run directory") == 1, result.stderr
        finally:
            subprocess.run(["umount", str(folder)], capture_output=True)


def test_full_disk_leaves_the_loop_going_and_whole_lines_readable(
    lmtop_env: dict[str, str],
) -> None:
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    result = scenario("loop", "5000", preexec_fn=small_files)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 5000
    assert result.stderr.count("cannot write the run file") == 1, result.stderr
    (path,) = Path(lmtop_env["LMTOP_DIR"]).glob("*/rank-0.jsonl")
    assert 0 < path.stat().st_size <= 50_000
    lines = path.read_bytes().splitlines()
    good = [schema.decode(line) for line in lines[:-1]]  # the last one may be cut short
    assert [m.seq for m in good] == list(range(len(good)))


def test_a_frozen_viewer_does_not_delay_exit(lmtop_env: dict[str, str]) -> None:
    def timed_run(before_freeze: subprocess.Popen[bytes] | None) -> tuple[float, dict[str, Any]]:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "scenario.py"), "exit_timing", "50000"],
            stdout=subprocess.PIPE,
            text=True,
        )
        if before_freeze is not None:
            assert before_freeze.stdout is not None
            start = orjson.loads(before_freeze.stdout.readline())  # the viewer is connected
            assert start["kind"] == "start"
            before_freeze.send_signal(signal.SIGSTOP)
        out, _ = proc.communicate(timeout=120)
        ended = time.time()
        lines = out.splitlines()
        return ended - json.loads(lines[-1])["main_ended"], json.loads(lines[0])

    alone, _ = timed_run(None)
    frozen = viewer()  # follows every live run of this user
    try:
        with_frozen, report = timed_run(frozen)
    finally:
        frozen.send_signal(signal.SIGCONT)
        frozen.kill()
        frozen.wait()
    assert report["steps"] == 50000
    assert with_frozen - alone < 0.5, (alone, with_frozen)


def test_a_forked_child_neither_corrupts_nor_ends_the_parents_run(
    lmtop_env: dict[str, str],
) -> None:
    result = scenario("forks", "40")
    assert result.returncode == 0
    assert "forked child is ignored" in result.stderr
    lines = run_lines(Path(lmtop_env["LMTOP_DIR"]))
    assert [line["seq"] for line in lines] == list(range(42))
    assert [line["step"] for line in lines[1:-1]] == list(range(40))
    assert sum(line["kind"] == "end" for line in lines) == 1 and lines[-1]["status"] == "ok"


def test_an_uncaught_exception_ends_the_run_with_error(lmtop_env: dict[str, str]) -> None:
    result = scenario("crash")
    assert result.returncode == 1 and "loss exploded" in result.stderr
    end = run_lines(Path(lmtop_env["LMTOP_DIR"]))[-1]
    assert end["kind"] == "end" and end["status"] == "error"
    assert end["error"] == "ValueError: loss exploded at step 0"


def test_ranks_of_one_launch_share_a_run_and_single_processes_do_not(
    lmtop_env: dict[str, str],
) -> None:
    for _ in range(2):
        assert scenario("loop", "3").returncode == 0
    for rank in range(2):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        assert scenario("loop", "3", env=env).returncode == 0
    runs = sorted(p.name for p in Path(lmtop_env["LMTOP_DIR"]).iterdir())
    assert len(runs) == 3, runs
    assert all(name.startswith("scenario-") for name in runs)
    shared = [p for p in Path(lmtop_env["LMTOP_DIR"]).iterdir() if (p / "rank-1.jsonl").exists()]
    assert len(shared) == 1 and (shared[0] / "rank-0.jsonl").exists()


def test_disable_turns_the_hook_off(lmtop_env: dict[str, str]) -> None:
    result = scenario("loop", "10", env={"LMTOP_DISABLE": "1"})
    assert result.returncode == 0 and not Path(lmtop_env["LMTOP_DIR"]).exists()


def test_import_hygiene() -> None:
    code = (
        "import sys, lmtop.hooks; "
        "print(sorted(m for m in ('textual', 'plotext', 'torch', 'numpy', 'lmtop.tui') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
