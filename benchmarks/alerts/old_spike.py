"""lmtop's first spike detector, kept as the benchmark's "lmtop old" baseline (``spikes.py``).

A point far above (or below) the rolling median, in rolling MADs. The viewer replaced it with
``TailSpikeDetector``, which learns each run's own tail: this one cried wolf every ~90 steps on
real LM gradient norms (issue 12). Its settings live here, not in ``alert_settings``, so that no
setting a user can write is one the viewer never reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmtop.tui.detectors import DOWN, SCALE_FLOOR, UP, Finding, RollingWindow


@dataclass(slots=True)
class OldSpikeSettings:
    """The old detector's settings, at the defaults it shipped with."""

    threshold: float = 7.5  # MADs beyond the rolling median
    window: int = 50  # recent values whose median and MAD are the baseline
    shift_steps: int = 10  # outliers in a row that are a new level, taken into the baseline
    warmup: int = 20  # points seen before the first alert
    merge_steps: int = 5  # points back at baseline before a new spike is a new alert
    log: bool = False  # judge positive series on a log scale


class SpikeDetector:
    """A point far above (or below) the rolling median, in MADs, in the metric's bad direction.

    The baseline is the median of the last ``window`` accepted values and the noise scale their
    median absolute deviation (MAD): the usual rolling definition, the one the labelled set in
    ``benchmarks/alerts`` uses to say a spike is k × MAD, so a spike of ``threshold`` MADs by
    that definition is exactly one that alerts. A point is a spike when it lies more than
    ``threshold`` MADs beyond the median. Positive series can be judged on a log scale (``log =
    true``): a loss near zero or a grad norm is noisy in proportion to its level. Spikes do not
    enter the baseline, so a long one stays one alert; a shift that persists for
    ``shift_steps`` points is taken into it and becomes the new level.
    """

    __slots__ = ("_calm", "_in_spike", "_log", "_outliers", "_seen", "_window", "direction", "s")

    def __init__(self, settings: OldSpikeSettings, direction: str = UP) -> None:
        self.s = settings
        self.direction = direction
        self._log = settings.log
        self._window = RollingWindow(settings.window)
        self._seen = 0
        self._in_spike = False
        self._calm = 0
        self._outliers = 0

    def update(self, value: float) -> Finding | None:
        """Takes the next finite value; returns a Finding when a new spike starts here."""
        if self._log and value <= 0:  # not a positive series after all: judge it as it is
            self._log = False
            self._window.clear()
            self._seen = 0
        x = _admit(self, value)
        if x is None:
            return None
        window = self._window
        level = window.median()
        residual = x - level
        if self.direction == UP:
            deviation = residual
        elif self.direction == DOWN:
            deviation = -residual
        else:
            deviation = abs(residual)
        s = self.s
        ready = self._seen > s.warmup and len(window) >= min(s.warmup, s.window)
        # Only a point on the bad side of the median can be a spike: the MAD, the costly part,
        # is taken for those alone (about half of them).
        floor = SCALE_FLOOR * (1.0 if self._log else abs(level))
        scale = max(window.mad(level), floor) if ready and deviation > 0 else 0.0
        if scale > 0 and deviation > s.threshold * scale:
            self._outliers += 1
            self._calm = 0
            if self._outliers >= s.shift_steps:  # not a spike: the level moved
                window.add(x)
            if self._in_spike:
                return None
            self._in_spike = True
            baseline = math.exp(level) if self._log else level
            return Finding(value, baseline, scale, deviation / scale)
        _settle(self, window, x)
        return None


def _admit(detector: SpikeDetector, value: float) -> float | None:
    """The value on the detector's scale (log or not), or None while its window fills."""
    x = math.log(value) if detector._log else value
    detector._seen += 1
    if len(detector._window) < 3:
        detector._window.add(x)
        return None
    return x


def _settle(detector: SpikeDetector, window: RollingWindow, x: float) -> None:
    """A point within bounds joins the baseline; ``merge_steps`` of them end a spike episode."""
    detector._outliers = 0
    window.add(x)
    if detector._in_spike:
        detector._calm += 1
        if detector._calm >= detector.s.merge_steps:
            detector._in_spike = False
