"""Streaming detectors for one series of one rank: constant work per point, bounded state.

Each detector is fed the finite values of one metric in step order and answers whether a *new*
episode starts at this point (one spike is one alert, however many points it spans), together
with the value and the baseline it was judged against. They know nothing of runs or messages;
:mod:`lmtop.tui.alerts` routes metrics to them and words the alerts.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .alert_settings import (
    ClippingSettings,
    DivergenceSettings,
    LearningRateSettings,
    SpikeSettings,
)

UP, DOWN, BOTH = "up", "down", "both"
SCALE_FLOOR = 0.01  # the noise scale is never taken below 1% of the level (constant series)
_ln, _exp = math.log, math.exp  # looked up once: the spike detector's hot path calls them


class RollingWindow:
    """The last ``size`` values with their median in O(1) and O(size) memmove per update."""

    __slots__ = ("_order", "_sorted", "size")

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._order)

    def add(self, value: float) -> None:
        """Adds a value, dropping the oldest when full."""
        if len(self._order) == self.size:
            old = self._order.popleft()
            del self._sorted[bisect_left(self._sorted, old)]
        self._order.append(value)
        insort(self._sorted, value)

    def median(self) -> float:
        """The median of the values held (NaN when empty)."""
        values, count = self._sorted, len(self._sorted)
        if not count:
            return math.nan
        middle = count // 2
        return values[middle] if count % 2 else 0.5 * (values[middle - 1] + values[middle])

    def mad(self, centre: float) -> float:
        """The median absolute deviation of the values held from ``centre`` (NaN when empty)."""
        return sorted_mad(self._sorted, centre)

    def clear(self) -> None:
        """Forgets every value."""
        self._order.clear()
        self._sorted.clear()


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (NaN when there are none), sorting a copy."""
    ordered = sorted(values)
    count = len(ordered)
    if not count:
        return math.nan
    middle = count // 2
    return ordered[middle] if count % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def sorted_mad(values: list[float], centre: float) -> float:
    """The median absolute deviation from ``centre`` of ``values``, sorted (NaN when empty).

    The distances come in increasing order by walking outwards from ``centre`` through the
    sorted values, so only half of them are looked at, none is sorted.
    """
    count = len(values)
    if not count:
        return math.nan
    right = bisect_left(values, centre)
    left = right - 1
    previous = current = 0.0
    for _ in range(count // 2 + 1):
        if left >= 0 and (right >= count or centre - values[left] <= values[right] - centre):
            distance = centre - values[left]
            left -= 1
        else:
            distance = values[right] - centre
            right += 1
        previous, current = current, distance
    return current if count % 2 else 0.5 * (previous + current)


WARNING, INFO, CRITICAL = "warning", "info", "critical"


@dataclass(slots=True)
class Finding:
    """A new episode: the value that started it and the baseline it was judged against."""

    value: float
    baseline: float
    scale: float = 0.0  # the noise scale (spikes) or margin (divergence) used
    size: float = 0.0  # spikes: the deviation in noise scales
    ratio: float = math.nan  # spikes: value / baseline (the running median)
    usual_ratio: float = math.nan  # spikes: this run's usual max of that ratio, bad direction
    severity: str = WARNING  # a hint for the engine: "critical" | "warning" | "info"
    note: str = ""  # more words for the alert's message (what it follows, a verdict's reason)


class TailSpikeDetector:
    """A spike judged against the run's own tail, on a log scale for positive series.

    For each value:

    - the baseline is the median of the last ``tail_window`` accepted values (log values for a
      positive series, so a grad norm or a near-zero loss is judged by ratios);
    - the noise scale is an EMA of the deviations above that median (below, for a drop), at
      least ``tail_spread_floor`` × the EMA of the absolute deviations, each deviation clipped
      at ``tail_winsor`` scales first, so a spike does not inflate its own baseline;
    - a point is an outlier when its deviation, in scales, passes both ``tail_threshold`` and
      ``tail_margin`` × the run's own ``tail_quantile`` of deviations, tracked by stochastic
      approximation (one step up on an exceedance, 99 times smaller steps down otherwise), so a
      run whose grad norm is heavy-tailed raises its own bar while a lone spike barely moves it;
    - the Finding says how big the spike is against the median (``ratio``) and against what is
      usual for this run (``usual_ratio``: the largest ratio of the points that were no
      outliers, from a full window on, forgotten over ``tail_memory`` steps), and hints a
      severity: ``warning`` when the value is at least ``warning_ratio`` × its median (× below
      it, for a drop), ``tail_ratio_margin`` × the run's usual ratio, and a full window is
      behind the median; else ``info``. So 10× is a warning on a run that usually swings 2-5×,
      and not on one whose own grad norm swings 10-190× (LoRA, batch 1, no clipping);
    - for the training loss (``loss=True``) a point is also an ``info`` outlier by the classic
      rule, ``mad_threshold`` rolling MADs above the median on the loss's own scale, when its
      excess over the median is past ``mad_usual_margin`` × this run's usual max excess: the
      noise scale above is learned on the log scale, where a near-zero loss's routine 3-6×
      swings hide a spike of 8 MADs.

    One spike is one Finding however many points it spans, except that an ``info`` episode
    that grows to ``warning`` size gives a second Finding. Outliers that persist for
    ``shift_steps`` points are a new level and enter the baseline. A non-finite value gives a
    ``critical`` Finding and leaves the state alone (the engine normally routes those itself).
    Constant work per update: a sorted-window insert, and a handful of float operations.
    """

    __slots__ = (
        "_calm",
        "_decay",
        "_down_step",
        "_held",
        "_in_spike",
        "_log",
        "_mads",
        "_order",
        "_outliers",
        "_quantile",
        "_ramping",
        "_scale",
        "_scale_count",
        "_seen",
        "_settings",
        "_severity",
        "_spread",
        "_up_step",
        "_usual",
        "_window",
        "direction",
        "s",
    )

    def __init__(self, settings: SpikeSettings, direction: str = UP, *, loss: bool = False) -> None:
        self.s = settings
        self.direction = direction
        self._mads = loss and direction == UP and settings.mad_threshold > 0
        self._log = True
        self._window = RollingWindow(settings.tail_window)
        # The window's own lists, reached without a hop: update() runs for every loss and grad
        # norm, where an attribute lookup costs as much as the arithmetic around it.
        self._held, self._order = self._window._sorted, self._window._order
        # The settings update() reads, in one tuple unpacked once a call (same reason).
        self._settings = (
            settings.tail_spread_floor,
            1.0 - settings.tail_alpha,
            settings.tail_winsor,
            settings.tail_margin,
            settings.tail_threshold,
            settings.warning_ratio,
            settings.tail_ratio_margin,
            settings.warmup,
            settings.tail_window,
            settings.mad_usual_margin,
        )
        self._scale = 0.0
        self._scale_count = 0
        self._ramping = True
        self._spread = 0.0
        self._quantile = settings.tail_quantile_start
        self._up_step = settings.tail_quantile_step * settings.tail_quantile
        self._down_step = settings.tail_quantile_step * (1.0 - settings.tail_quantile)
        self._usual = 1.0
        self._decay = math.exp(-1.0 / max(1, settings.tail_memory))
        self._seen = 0
        self._in_spike = False
        self._severity = INFO
        self._calm = 0
        self._outliers = 0

    @property
    def baseline(self) -> float:
        """The running median, in the metric's units (NaN before any value)."""
        level = self._window.median()
        return math.exp(level) if self._log and level == level else level

    def update(self, value: float, step: int = 0) -> Finding | None:
        """Takes the next value; returns a Finding when a new spike starts (or grows) here
        (``step`` unused: the engine's detector signature)."""
        if value - value != 0.0:  # NaN or ±Inf, without a function call
            return Finding(value, self.baseline, severity=CRITICAL)
        log = self._log
        if log and value <= 0:  # not a positive series after all: judge it as it is
            self._log = log = False
            self._window.clear()
            self._seen = 0
            self._scale = self._spread = 0.0
            self._scale_count = 0
            self._ramping = True
        # _admit and window.median(), inlined: this runs for every point of every loss and
        # grad norm, and a call costs more than the arithmetic.
        x = _ln(value) if log else value
        seen = self._seen = self._seen + 1
        held = self._held
        count = len(held)
        if count < 3:
            self._window.add(x)
            return None
        # window is tail_window, also the window's size from here on (one under 3 never gets here)
        (
            spread_floor,
            weight,
            winsor,
            margin,
            least_threshold,
            warning_ratio,
            ratio_margin,
            warmup,
            window,
            mad_margin,
        ) = self._settings
        middle = count >> 1
        level = held[middle] if count & 1 else 0.5 * (held[middle - 1] + held[middle])
        residual = x - level
        direction = self.direction
        if direction == UP:
            deviation = residual
        elif direction == DOWN:
            deviation = -residual
        else:
            deviation = abs(residual)
        floor = SCALE_FLOOR if log else SCALE_FLOOR * abs(level)
        spread, upper = self._spread, self._scale
        scale = spread * spread_floor
        if upper > scale:
            scale = upper
        if scale < floor:
            scale = floor
        # A series that never left 0 has no noise yet to judge a move by (0 / 0): its first
        # move teaches the scale instead.
        size = deviation / scale if scale > 0.0 else 0.0
        # The run's own quantile of sizes: up by a step on an exceedance, down by a small one.
        quantile = self._quantile
        if size > quantile:
            quantile = self._quantile = quantile + self._up_step
        else:
            quantile = self._quantile = quantile - self._down_step
        # The noise scale: EMAs of the deviations from the median, clipped first so a spike does
        # not inflate its own baseline. The one on the bad side alone (above the median, for a
        # loss) is what a spike is judged by: a log-loss's long lower tail says nothing of how
        # high it jumps. The two-sided one, scaled down, is its floor: a series falling steadily
        # below its lagging median has no bad side to learn from.
        if self._ramping:  # the first 1 / (1 - tail_alpha) points: a plain mean, unclipped at first
            scales = self._scale_count = self._scale_count + 1
            if scales * weight < 1.0:
                weight = 1.0 / scales
            elif scales > 1:
                self._ramping = False  # the EMA's weight from here on, and a clip
            limit = winsor * spread if scales > 1 else math.inf
        else:
            limit = winsor * spread
        distance = deviation if deviation > 0 else -deviation
        self._spread = spread + weight * ((distance if distance < limit else limit) - spread)
        if deviation > 0:
            self._scale = upper + weight * ((deviation if deviation < limit else limit) - upper)
        if log:
            ratio = _exp(deviation) if deviation < 700 else math.inf
        elif level > 0:
            ratio = value / level if direction == UP else (level / value if value > 0 else math.inf)
        else:
            ratio = 0.0
        threshold = margin * quantile
        if threshold < least_threshold:
            threshold = least_threshold
        # A warning-sized jump: ≥ warning_ratio × the median and well past the largest ratio
        # this run usually shows, once a full window is behind the median (a fine-tune's first
        # steps move by orders of magnitude: LoRA's B starts at zero).
        usual = self._usual
        big = ratio >= warning_ratio and ratio > ratio_margin * usual
        outlier = seen > warmup and size > threshold
        mads = self._mads
        if (
            big
            and not outlier
            and not mads
            and seen > window + warmup
            and usual * ratio_margin < warning_ratio
        ):
            # A grad norm ≥ 10× its median on a run whose usual swing is under 5× is a spike
            # even where the run's noise quantile is high (a LoRA grad norm's log-scale noise
            # makes 10× only 3-5 of its scales); once the usual swing itself reaches 5×, 10× is
            # this run's own tail. Not in the first steps after the window fills: the usual
            # swing is learned from there on.
            outlier = True
        if outlier and log and not mads and ratio < self.s.info_ratio:
            outlier = False  # a grad norm 1.2× its median on a smooth run is no record
        elif mads and residual > 0 and seen > warmup:
            if outlier:
                # The loss: an info spike must also be one by the classic rule, or a smooth
                # falling loss gives a record for every 1.1-1.3× bump (3-7 MADs)
                if not (big and seen > window):
                    outlier = self._beyond_mads(x, self.s.mad_threshold)
            elif ratio - 1.0 > mad_margin * (usual - 1.0):
                outlier = self._beyond_mads(x, self.s.mad_threshold)
                big = False  # found by the classic rule alone: info, however high its ratio
        # What is usual: the largest ratio of the recent points that were no outliers, from a
        # full window on, forgotten over tail_memory steps.
        if not outlier:
            if seen > window:
                usual *= self._decay
                self._usual = ratio if ratio > usual else (usual if usual > 1.0 else 1.0)
            # _settle and window.add, inlined (the common path: most points are no outlier)
            if self._outliers:
                self._outliers = 0
            order = self._order
            if count == window:
                del held[bisect_left(held, order.popleft())]
            order.append(x)
            insort(held, x)
            if self._in_spike:
                self._calm += 1
                if self._calm >= self.s.merge_steps:
                    self._in_spike = False
            return None
        self._outliers += 1
        self._calm = 0
        if self._outliers >= self.s.shift_steps:  # not a spike: the level moved
            self._window.add(x)
        severity = WARNING if big and seen > window else INFO
        if self._in_spike and (severity == INFO or self._severity == WARNING):
            return None
        self._in_spike = True
        self._severity = severity
        baseline = math.exp(level) if log else level
        return Finding(
            value,
            baseline,
            scale,
            size,
            value / baseline if baseline else math.nan,
            self._usual,
            severity,
        )

    def _beyond_mads(self, x: float, threshold: float) -> bool:
        """Whether ``x`` lies more than ``threshold`` rolling MADs above the rolling median, both
        taken on the metric's own scale (not the log): the classic rule.

        No MAD is computed: it is below the distance ``d = (value - median) / threshold`` when
        more than half of the window lies within ``d`` of the median, which two bisections of
        the sorted window count (on the log scale, where it is kept). Only when exactly half
        does (an even window, the MAD then the mean of two distances) is it computed.
        """
        held = self._window._sorted
        count = len(held)
        log = self._log
        middle = count // 2
        if count % 2:
            median = math.exp(held[middle]) if log else held[middle]
        elif log:
            median = 0.5 * (math.exp(held[middle - 1]) + math.exp(held[middle]))
        else:
            median = 0.5 * (held[middle - 1] + held[middle])
        value = math.exp(x) if log else x
        distance = (value - median) / threshold
        if distance <= 0:
            return False
        high, low = median + distance, median - distance
        if log:
            high = math.log(high)
            low = math.log(low) if low > 0 else -math.inf
        within = bisect_left(held, high) - bisect_right(held, low)  # |v - median| < distance
        if within * 2 != count:
            return within * 2 > count
        values = [math.exp(v) for v in held] if log else held
        return sorted_mad(values, median) < distance


class DivergenceDetector:
    """The training loss's rolling median far above the best it reached, after warm-up."""

    __slots__ = (
        "_bar",
        "_best",
        "_diverging",
        "_held",
        "_least",
        "_level",
        "_median",
        "_order",
        "_residuals",
        "_seen",
        "_start",
        "s",
    )

    def __init__(self, settings: DivergenceSettings) -> None:
        self.s = settings
        self._median = math.nan
        self._level = RollingWindow(settings.window)
        # The window's own lists, reached without a hop (every training loss comes here).
        self._held, self._order = self._level._sorted, self._level._order
        self._residuals: deque[float] = deque(maxlen=100)  # sorted only when the level is high
        self._start = max(settings.warmup, settings.window)  # points before any verdict
        self._best = math.inf
        # The margin's ratio term and the level past which the margin is looked at, both
        # computed once per new best rather than once per point.
        self._least = settings.ratio * abs(self._best)
        self._bar = self._best + self._least
        self._seen = 0
        self._diverging = False

    def update(self, value: float, step: int = 0) -> Finding | None:
        """Takes the next finite loss; returns a Finding when divergence starts here."""
        seen = self._seen = self._seen + 1
        level = self._median
        if level == level:  # the median before this value: not NaN once a value was seen
            self._residuals.append(value - level if value > level else level - value)
        # self._level.add(value) and .median(), inlined: every training loss comes here
        held, order = self._held, self._order
        if len(order) == self._level.size:
            del held[bisect_left(held, order.popleft())]
        order.append(value)
        insort(held, value)
        count = len(held)
        middle = count >> 1
        level = held[middle] if count & 1 else 0.5 * (held[middle - 1] + held[middle])
        self._median = level
        if seen < self._start:
            return None
        best = self._best
        if level < best:
            self._best = best = level
            self._least = self.s.ratio * abs(best)
            self._bar = best + self._least
        # The margin's noise term (a median of 100 residuals) is looked up only when the level
        # is past the cheaper term alone (best + least, the bar): the margin is at least that.
        least = self._least
        if not self._diverging:
            if level <= self._bar:
                return None
            margin = max(least, self.s.noise * median(self._residuals))
            if level > best + margin:
                self._diverging = True
                return Finding(level, best, margin)
        elif level >= best + least / 2:
            margin = max(least, self.s.noise * median(self._residuals))
            if level < best + margin / 2:
                self._diverging = False
        else:
            self._diverging = False
        return None


class ClippingDetector:
    """Grad norm above ``max_grad_norm`` on most of the recent steps."""

    __slots__ = ("_above", "_flags", "_saturated", "max_norm", "s")

    def __init__(self, settings: ClippingSettings, max_norm: float) -> None:
        self.s = settings
        self.max_norm = max_norm
        self._flags: deque[bool] = deque(maxlen=settings.window)
        self._above = 0
        self._saturated = False

    def update(self, grad_norm: float, step: int = 0) -> Finding | None:
        """Takes the next finite grad norm; returns a Finding when saturation starts here."""
        if len(self._flags) == self._flags.maxlen and self._flags[0]:
            self._above -= 1
        above = grad_norm > self.max_norm
        self._flags.append(above)
        self._above += above
        if len(self._flags) < self.s.min_points:
            return None
        fraction = self._above / len(self._flags)
        if not self._saturated and fraction >= self.s.fraction:
            self._saturated = True
            return Finding(fraction, self.max_norm)
        if self._saturated and fraction < 0.5:
            self._saturated = False
        return None


class LearningRateDetector:
    """A learning rate at zero after warm-up: cut abruptly, or never raised from zero."""

    __slots__ = ("_alerted", "_peak", "_previous", "s", "warmup_steps")

    def __init__(self, settings: LearningRateSettings, warmup_steps: int = 0) -> None:
        self.s = settings
        self.warmup_steps = warmup_steps
        self._peak = 0.0
        self._previous: float | None = None
        self._alerted = False

    def update(self, rate: float, step: int) -> Finding | None:
        """Takes the next finite learning rate; returns a Finding when it is newly stuck at zero."""
        if rate > 0:  # every step of a run: a comparison, not a max() call
            self._previous = rate
            if rate > self._peak:
                self._peak = rate
            self._alerted = False
            return None
        previous, self._previous = self._previous, rate
        if self._alerted:
            return None
        if self._peak > 0:
            # A schedule that decays to zero gets there from a small value; a cut does not.
            if previous is not None and previous > self.s.abrupt_fraction * self._peak:
                self._alerted = True
                return Finding(rate, previous)
            return None
        if step >= self.warmup_steps + self.s.zero_steps:
            self._alerted = True
            return Finding(rate, 0.0)
        return None


class Latch:
    """An episode flag with hysteresis: on above ``high``, off again below ``low``."""

    __slots__ = ("high", "low", "on")

    def __init__(self, high: float, low: float) -> None:
        self.high, self.low, self.on = high, low, False

    def update(self, value: float) -> bool:
        """True when ``value`` starts a new episode."""
        if not self.on and value > self.high:
            self.on = True
            return True
        if self.on and value < self.low:
            self.on = False
        return False
