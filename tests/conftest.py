"""Shared fixtures: every test gets its own run folder and its own private live registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(autouse=True)
def lmtop_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """LMTOP_DIR under tmp_path and a short LMTOP_RUNTIME_DIR (ipc paths are limited to 107 chars)."""
    runtime = tempfile.mkdtemp(prefix="lt", dir="/tmp")
    os.chmod(runtime, 0o700)
    monkeypatch.setenv("LMTOP_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LMTOP_RUNTIME_DIR", runtime)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The user's own config (alert settings, the relay's key) stays out of reach of the tests,
    # and no test writes a key into the real home.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LMTOP_RUN",
        "LMTOP_DISABLE",
        "LMTOP_CURVE_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)
    yield {"LMTOP_DIR": str(tmp_path / "runs"), "LMTOP_RUNTIME_DIR": runtime}
    shutil.rmtree(runtime, ignore_errors=True)


def launch(
    script: str, *args: str, rank: int = 0, world: int = 1, **env: str
) -> subprocess.Popen[bytes]:
    """Starts ``tests/scripts/<script>`` as one rank of a launch, the way torchrun would."""
    environment = dict(
        os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), **env
    )
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / script), *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def viewer(*args: str) -> subprocess.Popen[bytes]:
    """Starts ``lmtop --headless`` as a real process."""
    return subprocess.Popen(
        [sys.executable, "-m", "lmtop.tui", "--headless", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def fresh_hooks() -> Iterator[None]:
    """In-process runs: each test's publisher is finished before the next one starts."""
    yield
    from lmtop import hooks

    hooks.finish()
