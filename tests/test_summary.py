"""``lmtop --summary``: one line per run of a sweep, as a person or a script reads it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from runs import curve, write_run


def summary(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmtop", "--summary", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_summary_of_a_sweep_as_a_table_and_as_json(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    write_run(folder, name="lr-3e-4", ranks=2, steps=200)
    write_run(folder, name="lr-1e-3", ranks=1, steps=120, extra={100: {"loss": 9.0}})
    done = summary(str(folder))
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:4] == ["run", "state", "ranks", "step"]
    assert len(rows) == 2 and {r.split()[0] for r in rows} == {"lr-3e-4", "lr-1e-3"}
    first = next(r for r in rows if r.startswith("lr-3e-4"))
    # 200 steps of 0.2 s each (rank 0 ends last at 0.25 s per step: 51 s), the last loss, 2 ranks.
    last = curve(199, 200, 0)["loss"]
    assert " finished " in first and " 199 " in first and " 2 " in first
    assert f"{last:.4g}"[:4] in first

    records = [json.loads(line) for line in summary("--headless", str(folder)).stdout.splitlines()]
    by_run = {r["run"]: r for r in records}
    spiky = by_run["lr-1e-3"]
    assert spiky["kind"] == "summary" and spiky["last_step"] == 119
    assert spiky["best_eval_step"] == 119 and math.isclose(
        spiky["best_eval_loss"], min(0.5 + 2.0 * math.exp(-3 * s / 120) for s in range(19, 120, 20))
    )
    assert spiky["alerts"] >= 1, "the loss spike at step 100"
    assert by_run["lr-3e-4"]["ranks"] == 2 and by_run["lr-3e-4"]["best_loss"] <= last


def test_summary_of_nothing_says_so(tmp_path: Path) -> None:
    done = summary(str(tmp_path / "nothing"))
    assert done.returncode == 1 and "no runs found" in done.stderr


def test_the_summary_counts_the_alerts_headless_mode_prints(tmp_path: Path) -> None:
    """``--summary`` and ``--headless`` judge a run alike: one event seen by every rank (a NaN,
    an all-reduced grad norm's spike) is one alert in both, with the gravest severity."""
    run = write_run(
        tmp_path, name="shared", ranks=4, steps=300,
        extra={120: {"grad_norm": 40.0}, 200: {"loss": math.nan}, 250: {"loss": 30.0}},
    )  # fmt: skip
    printed = subprocess.run(
        [sys.executable, "-m", "lmtop", "--headless", "--no-follow", str(run)],
        capture_output=True,
        timeout=60,
    )
    told = [json.loads(x) for x in printed.stdout.splitlines() if b'"kind":"alert"' in x]
    (summed,) = [json.loads(x) for x in summary("--headless", str(run)).stdout.splitlines()]
    assert told and any(len(alert["ranks"]) == 4 for alert in told)
    assert summed["alerts"] == len(told)
    assert summed["critical"] == sum(alert["severity"] == "critical" for alert in told) >= 1
