"""A long history: what reading it costs must not grow with its length."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runs import write_run

# The child reports its own high-water mark: a forked child's rusage would count its parent's.
_HEADLESS = """
import sys
from lmtop.tui.cli import main
code = main(sys.argv[1:])
print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1], file=sys.stderr)
sys.exit(code)
"""


def _headless_peak_rss(run: Path) -> int:
    """Peak resident KB of ``lmtop --headless --no-follow --no-alerts RUN > /dev/null``."""
    args = ["--headless", "--no-follow", "--no-alerts", str(run)]
    done = subprocess.run(
        [sys.executable, "-c", _HEADLESS, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=True,
    )
    return int(done.stderr.splitlines()[-1])


def test_headless_memory_does_not_grow_with_history(tmp_path: Path) -> None:
    """Headless is a stream: ten times the history (23 MB of files) costs no more memory."""
    short = write_run(tmp_path, "short", ranks=2, steps=4_000)
    long = write_run(tmp_path, "long", ranks=2, steps=40_000)
    small, big = _headless_peak_rss(short), _headless_peak_rss(long)
    assert big / small < 1.25, (small >> 10, big >> 10)
