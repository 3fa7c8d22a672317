"""Numbers as a person reads them on the screen (what TensorBoard and W&B print)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from lmtop.tui import numbers


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (655348.3, "655k"),
        (591160.3, "591k"),
        (1234.5, "1.23k"),
        (999.96, "1k"),
        (1.5e6, "1.5M"),
        (2.5e9, "2.5G"),
        (3e-4, "3e-4"),
        (2.5e-5, "2.5e-5"),
        (0.000002, "2e-6"),
        (2.31, "2.31"),
        (0.2, "0.2"),
        (0.0123, "0.0123"),
        (30.0, "30"),
        (0, "0"),
        (-655348.3, "-655k"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (4.2e14, "420T"),
        (1e308, "1e308"),  # past T, scientific: not 309 digits
        (-3.3e20, "-3.3e20"),
    ],
)
def test_values_read_like_tensorboard(value: float, text: str) -> None:
    assert numbers.number(value) == text


@pytest.mark.parametrize(
    ("value", "text"), [(950, "950"), (1200, "1200"), (12_345, "12.3k"), (1_500_000, "1.5M")]
)
def test_steps_are_integers(value: int, text: str) -> None:
    assert numbers.step(value) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(42, "42s"), (185, "3m05s"), (3720, "1h02m"), (2 * 86400 + 3 * 3600, "2d03h"), (-5, "0s")],
)
def test_durations(seconds: float, text: str) -> None:
    assert numbers.duration(seconds) == text


def test_wall_time_ticks_are_relative_to_the_start() -> None:
    ticks = numbers.time_ticks(0, 3600, 5)
    assert ticks == [0, 900, 1800, 2700, 3600]
    assert [numbers.since_start(t) for t in ticks] == ["+0", "+15m", "+30m", "+45m", "+1h"]
    assert numbers.since_start(90) == "+1m30s"


def test_step_axis_ticks_are_round_integers() -> None:
    # The step axis read "0.0 117.5 235.0 352.5" on a 470-step run.
    ticks = numbers.nice_ticks(0, 470, 5)
    assert ticks == [0, 100, 200, 300, 400]
    assert numbers.tick_labels(ticks) == ["0", "100", "200", "300", "400"]
    assert numbers.tick_labels(numbers.nice_ticks(0, 1200, 4)) == ["0", "500", "1k"]
    assert numbers.tick_labels([0, 400, 800, 1200]) == ["0", "400", "800", "1.2k"]


def test_tick_labels_are_short_and_distinct() -> None:
    assert numbers.tick_labels([0, 1e-4, 2e-4, 3e-4]) == ["0", "1e-4", "2e-4", "3e-4"]
    assert numbers.tick_labels([5e-5, 1e-4, 1.5e-4]) == ["5e-5", "1e-4", "1.5e-4"]
    assert numbers.tick_labels([600_000, 650_000, 700_000]) == ["600k", "650k", "700k"]
    assert numbers.tick_labels([2.78, 2.79, 2.8]) == ["2.78", "2.79", "2.8"]
    assert numbers.tick_labels([0.5, 1.0, 1.5, 2.0]) == ["0.5", "1", "1.5", "2"]
    assert numbers.tick_labels([36_000, 38_000, 40_000]) == ["36k", "38k", "40k"]


def test_ticks_are_evenly_spaced() -> None:
    # The y ticks read "8.3 7.0 4.3 3.0".
    ticks = numbers.nice_ticks(2.9, 8.4, 5)
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(gaps) == 1 and ticks == [4, 6, 8]


@given(
    st.floats(-1e12, 1e12, allow_nan=False),
    st.floats(1e-9, 1e12, allow_nan=False),
    st.integers(2, 10),
)
@example(-1.192092896e-07, 1e-09, 4)  # "-1.1925e-7": 9 characters and a sign
def test_any_range_gets_few_distinct_ticks_inside_it(low: float, span: float, count: int) -> None:
    high = low + span
    if span < 1e-3 * max(abs(low), abs(high)):  # a chart's y range always has some span
        return
    ticks = numbers.nice_ticks(low, high, count)
    assert 1 <= len(ticks) <= count
    assert all(low - span * 1e-6 <= t <= high + span * 1e-6 for t in ticks)
    labels = numbers.tick_labels(ticks)
    assert len(set(labels)) == len(labels)
    assert all(len(label.removeprefix("-")) <= 9 for label in labels)
