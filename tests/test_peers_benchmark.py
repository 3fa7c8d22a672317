"""benchmarks/peers.py cannot rot: 200 steps on lmtop alone, every step persisted and seen live."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PEERS = Path(__file__).parents[1] / "benchmarks" / "peers.py"
SKIPPED = "skipped wandb: not installed (pip install -r benchmarks/requirements-peers.txt)"


def test_the_peers_benchmark_runs_on_lmtop_and_skips_what_is_not_installed() -> None:
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: its skip line cannot be checked")
    # The autouse fixture points LMTOP_DIR and LMTOP_RUNTIME_DIR at this test's own folders.
    command = [sys.executable, str(PEERS), "--libs", "lmtop,lmtop+viewer,wandb"]
    done = subprocess.run(
        [*command, "--steps", "200", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert SKIPPED in lines
    assert lines[0].startswith("machine: ") and "load average at start" in lines[0]
    assert "persisted: every step of every run (4 runs)" in lines

    table = lines[lines.index("| library | regime | run | median µs | p99 µs | max µs | total s | peak RSS MB | persisted |") :]  # fmt: skip
    table = table[2 : table.index("")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("lmtop", "tight", "1"),
        ("lmtop+viewer", "tight", "1"),
        ("lmtop", "paced", "1"),
        ("lmtop+viewer", "paced", "1"),
    ]
    for row in rows:
        median, p99, peak = float(row[3]), float(row[4]), float(row[7])
        assert 0 < median <= p99 and peak > 10, row
        if row[0] == "lmtop":
            assert row[8] == "200/200", row
        else:
            assert row[8].startswith("200/200 (viewer saw 200, "), row
    assert not any(line.startswith("| wandb") for line in lines)
