"""Issue 14: a shared GPU box, racing threads and hostile files lose nothing and run nothing.

Another local user is played by uid 65534 (``nobody``): the tests that hand files to it need
root (they are skipped otherwise); the rest run as anyone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import viewer
from lmtop.tui import alert_settings
from runs import line

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="handing a file to another user")


def python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Runs ``code`` in a fresh interpreter; returns its stdout, failing with its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in path.read_bytes().splitlines()]


# -- 1. a planted lmtop.toml runs nothing ------------------------------------------------------


def _nan_run(folder: Path) -> Path:
    run = folder / "job"
    run.mkdir(parents=True)
    (run / "rank-0.jsonl").write_bytes(
        line("job", 0, 1, 0, "start", None, 1.0, info={})
        + line("job", 0, 1, 1, "metrics", 0, 2.0, m={"loss": "NaN"})
        + line("job", 0, 1, 2, "end", 0, 3.0, status="ok")
    )
    return run


def test_a_planted_config_beside_the_data_sets_thresholds_but_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    runs = tmp_path / "shared"
    run = _nan_run(runs)
    pwned = tmp_path / "pwned"
    (runs / "lmtop.toml").write_text(f'on_alert = "touch {pwned}"\n[spike]\nthreshold = 9\n')
    watcher = viewer("--no-follow", str(run))
    _, stderr = watcher.communicate(timeout=60)
    assert watcher.returncode == 2  # the NaN alert fired ...
    assert b"on_alert ignored" in stderr
    time.sleep(0.3)
    assert not pwned.exists()  # ... and the planted command did not run
    settings_ = alert_settings.load([str(run)])
    assert settings_.on_alert is None and settings_.spike.threshold == 9.0


def _own_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    """The user's own lmtop.toml, under a private $XDG_CONFIG_HOME."""
    home = tmp_path / "home"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    (home / "lmtop").mkdir(parents=True)
    own = home / "lmtop" / "lmtop.toml"
    own.write_text(text)
    return own


def test_commands_come_from_the_users_own_file_config_or_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _own_config(tmp_path, monkeypatch, 'on_alert = "notify-send lmtop"\n')
    assert alert_settings.load([]).on_alert == "notify-send lmtop"
    explicit = tmp_path / "team.toml"
    explicit.write_text('[alerts]\non_alert = "mail me"\n')
    assert alert_settings.load([], config=str(explicit)).on_alert == "mail me"
    assert alert_settings.load([], overrides=["on_alert=echo"]).on_alert == "echo"


def test_a_config_writable_by_others_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    own = _own_config(tmp_path, monkeypatch, 'on_alert = "echo"\n')
    own.chmod(0o666)
    with pytest.raises(alert_settings.SettingsError, match="writable by group or others"):
        alert_settings.load([])
    with pytest.raises(alert_settings.SettingsError, match="writable by group or others"):
        alert_settings.load([], config=str(own))
    own.unlink()
    beside = tmp_path / "runs"
    beside.mkdir()
    (beside / "lmtop.toml").write_text("[spike]\nthreshold = 9\n")
    (beside / "lmtop.toml").chmod(0o620)
    assert alert_settings.load([str(beside)]).spike.threshold == 7.5  # skipped, with a note
    assert "writable by group or others" in capfd.readouterr().err
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(alert_settings.SettingsError, match="not a regular file"):
        alert_settings.load([], config=str(fifo))  # and it did not hang


@needs_root
def test_a_config_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    theirs = tmp_path / "theirs.toml"
    theirs.write_text('on_alert = "echo"\n')
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(alert_settings.SettingsError, match="owned by uid 65534"):
        alert_settings.load([], config=str(theirs))
    beside = tmp_path / "runs"
    beside.mkdir()
    (beside / "lmtop.toml").write_text("[spike]\nthreshold = 9\n")
    os.chown(beside / "lmtop.toml", NOBODY, NOBODY)
    assert alert_settings.load([str(beside)]).spike.threshold == 7.5
    assert "owned by uid 65534" in capfd.readouterr().err
