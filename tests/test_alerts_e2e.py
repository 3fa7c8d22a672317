"""End to end: ``lmtop --headless`` as a real process prints alerts and exits 2 on critical ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import viewer

TRAINING = textwrap.dedent(
    """
    import math, os, random
    from lmtop import hooks
    rank = int(os.environ["RANK"])
    rng = random.Random(rank)
    hooks.init(run="job", config={"max_grad_norm": 5.0})
    for step in range(400):
        loss = 2.0 + math.exp(-step / 50) + rng.uniform(-0.03, 0.03)
        grad_norm = 1.0 + rng.uniform(-0.05, 0.05)  # bounded noise: no natural outliers
        if os.environ.get("INJECT") and rank == 1 and step == 200:
            loss += 30.0  # 16x its median: a warning (a 2x blip the run absorbs is only info)
        if os.environ.get("INJECT") and rank == 0 and step == 300:
            grad_norm = float("nan")
        hooks.publish({"loss": loss, "grad_norm": grad_norm, "lr": 1e-4}, step=step)
    hooks.finish()
    """
)


def _train(inject: bool) -> None:
    env = dict(os.environ, WORLD_SIZE="2", **({"INJECT": "1"} if inject else {}))
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", TRAINING], env=dict(env, RANK=str(r), LOCAL_RANK=str(r))
        )
        for r in range(2)
    ]
    for job in jobs:
        assert job.wait(timeout=60) == 0


def _alerts(stdout: bytes) -> list[dict]:
    records = [json.loads(line) for line in stdout.splitlines()]
    return [r for r in records if r.get("kind") == "alert"]


def test_headless_reports_an_injected_spike_and_nan_with_step_and_rank_and_exits_2(
    lmtop_env: dict[str, str],
) -> None:
    runs = Path(lmtop_env["LMTOP_DIR"])
    watcher = viewer(str(runs))  # following, started before the job
    _train(inject=True)
    stdout, stderr = watcher.communicate(timeout=60)
    assert watcher.returncode == 2, stderr.decode()
    alerts = _alerts(stdout)
    found = {(a["type"], a["severity"], a["rank"], a["metric"], a["step"]) for a in alerts}
    assert found == {
        ("spike", "warning", 1, "loss", 200),
        ("nonfinite", "critical", 0, "grad_norm", 300),
    }, alerts
    nan = next(a for a in alerts if a["type"] == "nonfinite")
    assert nan["value"] == "NaN" and nan["run"] == "job" and "grad_norm" in nan["message"]
    spike = next(a for a in alerts if a["type"] == "spike")
    assert spike["value"] > 31.9 and 1.9 < spike["baseline"] < 2.1
    snapshot = runs / "job" / "alerts" / "nonfinite-rank0-step300.jsonl"
    lines = [json.loads(line) for line in snapshot.read_text().splitlines()]
    assert lines[0]["kind"] == "alert"
    steps = {(m["rank"], m["step"]) for m in lines[1:]}
    assert (0, 250) in steps and (1, 350) in steps and (0, 249) not in steps


def test_headless_on_a_clean_run_prints_no_alert_and_exits_0(lmtop_env: dict[str, str]) -> None:
    _train(inject=False)
    watcher = viewer("--no-follow", str(Path(lmtop_env["LMTOP_DIR"]) / "job"))
    stdout, stderr = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, stderr.decode()
    assert _alerts(stdout) == []
    assert len(stdout.splitlines()) == 2 * 402  # every message is still there


def test_on_alert_runs_the_command_with_the_alert_on_stdin(
    lmtop_env: dict[str, str], tmp_path: Path
) -> None:
    _train(inject=True)
    out = tmp_path / "got.jsonl"
    watcher = viewer(
        "--no-follow",
        "--on-alert",
        f"cat >> {out}",
        "--alert-set",
        "spike.enabled=false",
        lmtop_env["LMTOP_DIR"],
    )
    stdout, _ = watcher.communicate(timeout=60)
    assert watcher.returncode == 2
    assert [a["type"] for a in _alerts(stdout)] == ["nonfinite"]
    for _ in range(100):  # the command runs detached
        if out.exists() and out.read_text().strip():
            break
        subprocess.run(["sleep", "0.05"])
    assert json.loads(out.read_text())["step"] == 300
