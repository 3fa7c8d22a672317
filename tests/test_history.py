"""A long history: what reading it costs must not grow with its length."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from lmtop.hooks import schema
from lmtop.tui.store import Series, Store
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


_NAME_SETS = (("loss", "lr"), ("loss", "lr", "grad_norm"), ("eval_loss",), ("lr", "loss"))


@given(
    st.lists(
        st.tuples(
            st.integers(0, 1),  # rank
            st.integers(0, len(_NAME_SETS) - 1),  # which metrics
            st.integers(-3, 5),  # step change: sometimes back
            st.sampled_from([1.0, -2.5, math.nan, math.inf, -math.inf, 1e300]),
        ),
        max_size=300,
    ),
    st.lists(st.integers(1, 40), min_size=1, max_size=10),
)
@settings(max_examples=150, deadline=None)
def test_series_that_share_steps_hold_what_each_would_alone(
    plan: list[tuple[int, int, int, float]], cuts: list[int]
) -> None:
    """Metrics of the same messages share one steps/times column; each series still holds
    exactly its own points (a step that goes back dropped per series), and draws the same."""
    step = [10, 10]
    batch = []
    for seq, (rank, which, change, value) in enumerate(plan):
        step[rank] = max(0, step[rank] + change)
        names = _NAME_SETS[which]
        m = {name: value * (i + 1) for i, name in enumerate(names)}
        message = schema.Message("r", rank, 2, seq, 1.0 + seq, "metrics", step[rank], m, {})
        batch.append(("key", message))
    store = Store()
    at = 0
    for cut in cuts * 40:
        store.add(batch[at : at + cut])
        at += cut
        if at >= len(batch):
            break
    store.add(batch[at:])
    expected: dict[tuple[str, int, str], Series] = {}
    for _, message in batch:
        for name, value in message.m.items():
            alone = expected.setdefault(("key", message.rank, name), Series())
            if not len(alone) or message.step >= alone.steps[-1]:
                alone.extend([message.step], [message.t], [value])
    assert set(store.series) == set(expected)
    for key, alone in expected.items():
        series = store.series[key]
        assert list(series.steps) == list(alone.steps) and list(series.times) == list(alone.times)
        assert [repr(v) for v in series.values] == [repr(v) for v in alone.values]
        for by_time in (False, True):
            assert repr(series.columns(0, 2000, 7, by_time)) == repr(
                alone.columns(0, 2000, 7, by_time)
            )
    dropped = sum(1 for _, m in batch for n in m.m) - sum(len(s) for s in expected.values())
    assert store.backwards.get("key", 0) == dropped
