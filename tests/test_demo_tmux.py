"""`lmtop demo` for real in tmux: what a person sees, and a clean exit on q."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed"),
]


def rank_processes(folder: Path) -> list[int]:
    """Live processes whose environment names our demo folder."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"LMTOP_DIR={folder}".encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry))
    return found


def test_demo_in_tmux_shows_charts_and_ranks_and_q_reaps_every_child(tmp_path: Path) -> None:
    socket = f"lt{os.getpid()}"
    folder = tmp_path / "demo"
    tmux = ["tmux", "-L", socket]
    # pytest exports COLUMNS/LINES, which would pin the app to 80x24 inside the 160x48 pane.
    command = f"env -u COLUMNS -u LINES {sys.executable} -m lmtop.tui demo --ranks 3 --steps 100000 --dir {folder}; echo EXITED $?; sleep 60"
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "demo", "-x", "160", "-y", "48", command], check=True
    )

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "demo"], capture_output=True, text=True
        ).stdout

    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = screen()
            if "loss" in text and "straggler" in text and "s/step" in text:
                break
            time.sleep(0.5)
        assert "loss" in text and "learning rate" in text and "grad norm" in text, text
        assert "rank" in text and "s/step" in text and "straggler" in text, text
        assert "live" in text and "world 3" in text, text
        assert "┤" in text, "charts with a y axis"
        assert len(rank_processes(folder)) == 3
        subprocess.run([*tmux, "send-keys", "-t", "demo", "q"], check=True)
        deadline = time.monotonic() + 20
        while "EXITED" not in text and time.monotonic() < deadline:
            time.sleep(0.3)
            text = screen()
        assert "EXITED 0" in text, text
        assert rank_processes(folder) == [], "every simulated rank is stopped and reaped"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
