"""A long history: what reading it costs must not grow with its length."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmtop.hooks import schema
from lmtop.tui import follow, replay
from lmtop.tui.alert_actions import Alerting
from lmtop.tui.alert_settings import AlertSettings
from lmtop.tui.follow import Follower
from lmtop.tui.replay import HistoryAlerts
from lmtop.tui.store import Series, Store
from runs import T0, curve, line, write_run

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
    """Headless is a stream: four times the history (23 MB of files against 5.8 MB, each more
    than one poll reads) costs no more memory (51 and 52 MB, 2026-11-30)."""
    short = write_run(tmp_path, "short", ranks=2, steps=10_000)
    long = write_run(tmp_path, "long", ranks=2, steps=40_000)
    small, big = _headless_peak_rss(short), _headless_peak_rss(long)
    assert big / small < 1.1, (small >> 10, big >> 10)


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


def _poll_until(follower: Follower, history: HistoryAlerts, alerts: list[Any]) -> int:
    """Polls until a batch comes (the follower reads an idle rank again within 2 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = follower.poll(0.05)
        alerts += history.take(batch)
        if batch:
            return len(batch)
    return 0


@pytest.mark.parametrize("held", [40_000, 10])
def test_alerts_over_a_history_come_after_it_each_message_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: int
) -> None:
    """A history read in many polls raises no alert while it is read (its first frame does not
    wait for them); its alerts come afterwards from the files read again, and messages that
    arrive meanwhile reach the engine once each, after the history (held, or past ``held``
    of them read again by a second replay): the alerts are a plain read's."""
    monkeypatch.setattr(replay, "HELD_MESSAGES", held)
    monkeypatch.setattr(replay, "REPLAY_FROM_BYTES", 0)  # 2.5 MB stands for a long history
    monkeypatch.setattr(follow, "READ_BUDGET", 64 << 10)  # many polls
    monkeypatch.setattr(follow, "MIN_READ", 16 << 10)
    spikes = {500: {"loss": 10.0}, 1500: {"loss": 12.0}}
    # A run of this process, alive, on this host: its ranks are followed as they grow.
    run_dir = write_run(
        tmp_path, "hist", 2, 3000, ended=False, extra=spikes, pid=os.getpid(), host=follow.HOST
    )
    follower = Follower([str(run_dir)], follow=True, live=False)
    alerting = Alerting(AlertSettings(), follower.runs)
    fed: list[tuple[str, int, int]] = []

    def feed(batch: list[tuple[str, schema.Message]]) -> list[Any]:
        fed.extend((key, m.rank, m.seq) for key, m in batch)
        return [alert for _, alert in alerting.feed_batch(batch)]

    history = HistoryAlerts(feed, follower)
    alerts: list[Any] = []
    polls = 0
    while not history.owed:
        alerts += history.take(follower.poll(0))
        polls += 1
    assert polls > 10 and alerts == [] and history.replaying
    history.start()
    # Rank 0 goes on (a spike among its new steps) while the history is read again.
    rank0 = run_dir / "rank-0.jsonl"
    seq = orjson.loads(rank0.read_bytes().splitlines()[-1])["seq"]
    with rank0.open("ab") as f:
        for step in range(3000, 3200):
            seq += 1
            m = curve(step, 3000) | ({"loss": 11.0} if step == 3100 else {})
            f.write(line("hist", 0, 2, seq, "metrics", step, T0 + 1 + step * 0.2, m=m))
    assert _poll_until(follower, history, alerts) > 0  # held: the replay is not done
    while history.replaying:  # as the app's poll loop goes
        alerts += history.take(follower.poll(0))
        if history.owed:
            history.start()
        alerts += history.step()
    rank = follower.runs[str(run_dir)].ranks[0]
    deadline = time.monotonic() + 20
    while rank.applied < seq and time.monotonic() < deadline:  # the rest, as it comes
        alerts += history.take(follower.poll(0.05))
    follower.close()

    plain = Follower([str(run_dir)], follow=False, live=False)
    plain_alerting = Alerting(AlertSettings(), plain.runs)
    expected, every = [], []
    while not plain.done:
        batch = plain.poll(0)
        every += [(key, m.rank, m.seq) for key, m in batch]
        expected += [alert for _, alert in plain_alerting.feed_batch(batch)]
    assert sorted(fed) == sorted(every), "each message fed to the engine exactly once"
    told = sorted((a.type, a.rank, a.metric, a.step) for a in alerts)
    assert told == sorted((a.type, a.rank, a.metric, a.step) for a in expected)
    assert ("spike", 0, "loss", 3100) in told and ("spike", 0, "loss", 1500) in told


def test_a_settled_viewer_still_collects_cycles() -> None:
    """The viewer's collector settings (rarer collections, start-up frozen) still free cyclic
    garbage as it is made: 300,000 dropped cycles of 1 KB each leave the process within
    :data:`~lmtop.tui.collector.YOUNG` of them (~55 MB; 60 MB measured) of where it started,
    not 300 MB up."""
    code = """
import gc, resource
from lmtop.tui import collector
collector.settle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(300_000):
    cycle = [bytearray(1024)]
    cycle.append(cycle)
del cycle
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grown, gc.get_stats()[0]["collected"], gc.get_threshold()[0])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    grown_kb, collected, young = map(int, done.stdout.split())
    assert young > 700  # settled: rarer than CPython's default
    assert collected >= 200_000 and grown_kb < 100 * 1024, (grown_kb, collected)


def test_collections_are_rare_while_a_history_is_read_and_as_usual_once_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headless mode makes the collector's youngest generation large while it reads a history
    and gives it back as it found it once the history is read: following a live run for days,
    the viewer collects as CPython does (the app with rare collections grew 5.7 MB a minute
    against 4.7 live, 16 ranks, ten minutes side by side)."""
    from lmtop.tui import collector, headless
    from lmtop.tui.alert_settings import AlertSettings

    run = write_run(tmp_path, "r", ranks=2, steps=20_000)  # 11 MB: more than one poll reads
    usual = gc.get_threshold()
    seen: list[int] = []
    set_threshold = gc.set_threshold

    def recording(*thresholds: int) -> None:
        seen.append(thresholds[0])
        set_threshold(*thresholds)

    monkeypatch.setattr(collector.gc, "set_threshold", recording)
    with open(os.devnull, "wb") as out:
        headless.run([str(run)], follow=False, out=out, settings=AlertSettings(enabled=False))
    assert collector.YOUNG in seen and gc.get_threshold() == usual
