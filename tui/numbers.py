"""Numbers as people read them: ``655k``, ``3e-4``, ``1.2k`` steps, ``1h02m``, ``+12m``.

One module for every number on the screen (chart ticks, the ranks table, the header, alert text),
as TensorBoard and W&B print them: SI suffixes for large values, scientific notation for small
ones, integer steps, short durations. Also where the charts' ticks are chosen: evenly spaced
"nice" values (1, 2, 2.5 or 5 times a power of ten) whose labels fit the space they have.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
NICE = (1.0, 2.0, 2.5, 5.0, 10.0)
# Wall-time tick steps, in seconds: seconds, minutes, hours, days.
TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200)
DAY = 86400


def _trim(text: str) -> str:
    """``"2.50"`` -> ``"2.5"``, ``"3.00"`` -> ``"3"``."""
    return text.rstrip("0").rstrip(".") if "." in text else text


def _special(value: float) -> str | None:
    if value != value:
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return None


def number(value: float, digits: int = 3) -> str:
    """A value in ``digits`` significant digits: ``655k``, ``2.31``, ``3e-4``, ``1.2M``."""
    special = _special(value)
    if special is not None:
        return special
    if value == 0:
        return "0"
    size = abs(value)
    sign = "-" if value < 0 else ""
    if size < 1e-3 or size >= 1e15:  # past T: scientific, as for the very small
        mantissa, exponent = f"{size:.{digits - 1}e}".split("e")
        return f"{sign}{_trim(mantissa)}e{int(exponent)}"
    text, suffix = _significant(size, digits), ""
    for scale, larger in reversed(SI):  # k, M, G, T: the first one that brings it under 1000
        if float(text) < 1000:
            break
        text, suffix = _significant(size / scale, digits), larger
    return sign + text + suffix


def _significant(value: float, digits: int) -> str:
    return _trim(f"{value:.{max(0, digits - 1 - _magnitude(value))}f}")


def _magnitude(value: float) -> int:
    """The power of ten of ``value``'s leading digit (``0.0123`` -> ``-2``)."""
    return math.floor(math.log10(value)) if value > 0 else 0


def step(value: float | None) -> str:
    """A step count: ``950``, ``1.2k``, ``12k``, ``1.5M`` (exact below 10,000: ``1200``)."""
    if value is None:
        return "-"
    special = _special(value)
    if special is not None:
        return special
    return str(int(value)) if abs(value) < 10_000 else number(value)


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``, ``2d03h``: the two largest units."""
    if seconds != seconds or math.isinf(seconds):
        return "-"
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, DAY)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def since_start(seconds: float) -> str:
    """A wall-time tick, relative to the run's start: ``+0``, ``+30s``, ``+12m``, ``+1h30m``."""
    if seconds <= 0:
        return "+0"
    text = duration(seconds)
    # "12m00s" says no more than "12m" on an axis whose ticks are whole minutes.
    for zero in ("00s", "00m", "00h"):
        text = text.removesuffix(zero)
    return "+" + text


def nice_ticks(low: float, high: float, count: int, integer: bool = False) -> list[float]:
    """At most ``count`` evenly spaced round values inside ``[low, high]`` (at least one).

    ``integer``: whole numbers only (steps), so the gap is at least 1.
    """
    if not (math.isfinite(low) and math.isfinite(high)) or count < 1:
        return []
    if high <= low:
        return [low]
    if not math.isfinite(high - low):  # finite ends ±1e308 apart: the ends and zero
        return [low, 0.0, high] if count >= 3 and low < 0 < high else [low, high][:count]
    raw = (high - low) / max(1, count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in NICE:
        gap = factor * power
        if integer and (gap < 1 or gap != int(gap)):
            continue
        ticks = _multiples(low, high, gap)
        if len(ticks) <= count:
            return ticks or [low]
    return [low]


def _multiples(low: float, high: float, gap: float) -> list[float]:
    first = math.ceil(low / gap - 1e-9)
    last = math.floor(high / gap + 1e-9)
    # Round away float noise (0.30000000000000004), keeping the gap's precision.
    places = max(0, 12 - math.floor(math.log10(gap)))
    return [round(n * gap, places) if places < 300 else n * gap for n in range(first, last + 1)]


def time_ticks(low: float, high: float, count: int) -> list[float]:
    """Wall-time ticks (seconds since the start) on round seconds, minutes, hours or days."""
    if not (math.isfinite(low) and math.isfinite(high)) or count < 1:
        return []
    if high <= low:
        return [low]
    for gap in (*TIME_STEPS, *(DAY * d for d in (1, 2, 7, 14, 30, 60, 180, 365))):
        ticks = _multiples(low, high, float(gap))
        if len(ticks) <= count:
            return ticks or [low]
    return [low]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels for evenly spaced ticks, as short as they can be while all stay distinct.

    ``[0, 1e-4, 2e-4]`` -> ``0 1e-4 2e-4``; ``[600000, 650000]`` -> ``600k 650k``;
    ``[2.78, 2.79]`` -> ``2.78 2.79``.
    """
    if not ticks:
        return []
    size = max(abs(t) for t in ticks)
    gap = min((abs(b - a) for a, b in itertools.pairwise(ticks) if b != a), default=size or 1.0)
    if size == 0:
        return ["0" for _ in ticks]
    if size < 1e-3:
        return [_scientific(t, gap) for t in ticks]
    return [_si_tick(t, gap) for t in ticks]


def _si_tick(value: float, gap: float) -> str:
    """One tick in the largest SI unit it reaches, with the places its gap needs."""
    if value == 0:
        return "0"
    for scale, suffix in SI:
        if abs(value) >= scale:
            return _trim(f"{value / scale:.{_decimals(gap / scale)}f}") + suffix
    return _trim(f"{value:.{_decimals(gap)}f}")


def _decimals(gap: float) -> int:
    """Decimal places that tell two ticks ``gap`` apart (2.5 needs one; 0.25 two)."""
    for places in range(0, 12):
        if abs(round(gap, places) - gap) <= gap * 1e-6:
            return places
    return 12


def _scientific(value: float, gap: float) -> str:
    """One tick as ``mantissa e exponent``, with the places its gap needs."""
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    mantissa = f"{value / 10.0**exponent:.{_decimals(gap / 10.0**exponent)}f}"
    if abs(float(mantissa)) >= 10:  # 9.99e-5 rounded up: 1e-4
        exponent += 1
        mantissa = f"{value / 10.0**exponent:.{_decimals(gap / 10.0**exponent)}f}"
    return f"{_trim(mantissa)}e{exponent}"
