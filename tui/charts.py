"""What each chart shows, and how a chart's picture is computed from the store.

Plain Python apart from the plotext object it draws on, so tests can check what a chart holds
(the y range reaches a spike, a NaN has its mark) without starting the app.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import axes, metrics
from .axes import Axis
from .store import Columns, Store
from .text import inert

# plotext's colour names and the terminal colour each one prints. They are not Rich's: plotext's
# "orange" is ANSI 3 (what Rich calls yellow), "orange+" ANSI 11 (bright yellow), and a name
# plotext does not know ("yellow") silently prints its default, bright blue.
PLOTEXT_ANSI = {
    "red": 1,
    "green": 2,
    "orange": 3,
    "blue": 4,
    "magenta": 5,
    "cyan": 6,
    "gray": 8,
    "red+": 9,
    "green+": 10,
    "orange+": 11,
    "blue+": 12,
    "magenta+": 13,
    "cyan+": 14,
    "white": 15,
}
# One colour per rank, the same in the charts and the ranks table. Red is the NaN marks',
# bright yellow the alert marks', bright magenta the second kind of line (eval): none is a rank's.
RANK_COLORS = ("cyan", "orange", "green", "magenta", "blue+", "cyan+", "green+", "white")
KIND_COLORS = ("", "magenta+", "red+", "blue")  # per kind after the first, which is per rank
ALERT_COLOR = "orange+"
NAN_COLOR = "red"
EVENT_COLOR = "default"  # the terminal's own foreground: an event is neither good nor bad


def rich_color(name: str) -> str:
    """The Rich colour that prints what plotext prints for ``name``: the same terminal colour."""
    code = PLOTEXT_ANSI.get(name)
    return name if code is None else f"color({code})"


def line_color(rank: int, kind: int) -> str:
    """The colour of one rank's line of the ``kind``-th kind (train 0, eval 1)."""
    if kind == 0:
        return RANK_COLORS[rank % len(RANK_COLORS)]
    return KIND_COLORS[kind % len(KIND_COLORS)] or RANK_COLORS[0]


@dataclass(frozen=True, slots=True)
class ChartSpec:
    """One chart: its title and, per line, the metric names it accepts (first found wins)."""

    key: str
    title: str
    lines: tuple[tuple[str, ...], ...]
    labels: tuple[str, ...] = ("",)


DEFAULT_CHARTS = (
    ChartSpec("loss", "loss", (metrics.LOSS_NAMES, metrics.EVAL_LOSS_NAMES), ("train", "eval")),
    ChartSpec("lr", "learning rate", (metrics.LR_NAMES,)),
    ChartSpec("grad_norm", "grad norm", (metrics.GRAD_NORM_NAMES,)),
    ChartSpec("throughput", "throughput", (metrics.THROUGHPUT_NAMES,)),
    ChartSpec("step_time", "step time (s)", (metrics.STEP_TIME_NAMES,)),
    ChartSpec("memory", "memory (GB)", (metrics.MEMORY_GB_NAMES,)),
)


def metric_chart(name: str) -> ChartSpec:
    """A chart of any one metric, for the chart picker."""
    return ChartSpec(f"metric:{name}", name, ((name,),))


@dataclass(slots=True)
class ViewOptions:
    """How charts are drawn; the keys change these."""

    smoothing: float = 0.6  # 0 = off; the exponential weight, as in TensorBoard
    log_y: bool = False
    window: int | None = None  # last N steps, or None for the whole run
    by_time: bool = False
    rank_mode: str = "overlay"  # "overlay", "band" or "one"
    rank: int = 0
    compare: bool = False  # runs overlaid, one colour per run
    overlaid: set[str] = field(default_factory=set)  # the runs to overlay (keys); none: all


@dataclass(slots=True)
class Line:
    """One drawn line: what plotext is handed."""

    label: str
    x: list[float]
    y: list[float]
    color: str
    faint: bool = False
    # "dot" (one cell per point) for the raw min-max envelope: braille would rasterise each
    # column's whole min-max span at 2x4 dots per cell, which for a noisy series costs plotext
    # ~10x more (benchmarks/README.md); the thin smoothed line keeps braille's resolution.
    marker: str = "braille"


@dataclass(slots=True)
class Picture:
    """Everything one chart draws, before plotext."""

    title: str
    lines: list[Line] = field(default_factory=list)
    # (x, why): "nan"/"inf" steps, "alert" steps, "event" (an evaluation, a checkpoint, ...)
    marks: list[tuple[float, str]] = field(default_factory=list)
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, why): clipping threshold
    y_low: float = math.inf
    y_high: float = -math.inf
    x_low: float = 0.0
    x_high: float = 1.0
    x_origin: float = 0.0  # wall-time x: the run's start, where "+0" is
    note: str = ""

    def legend(self) -> list[tuple[str, list[str]]]:
        """(label, colours) per kind of line (train, eval), when a chart draws more than one kind
        or more than one rank: a kind drawn per rank lists its ranks' colours (the ranks
        table's), in rank order."""
        kinds: dict[str, list[str]] = {}
        for line in self.lines:
            if not line.faint:
                kind = re.sub(r"( (r\d+|\(smoothed\)|min|median|max))+$", "", line.label)
                colours = kinds.setdefault(kind, [])
                if line.color not in colours:
                    colours.append(line.color)
        if len(kinds) > 1 or any(len(c) > 1 for c in kinds.values()):
            return list(kinds.items())
        return []

    @property
    def empty(self) -> bool:
        """Whether there is nothing to draw."""
        return not self.lines


def resolve(spec: ChartSpec, names: set[str]) -> list[str | None]:
    """The metric each line of ``spec`` draws in a run that publishes ``names``."""
    return [metrics.first_present(candidates, names) for candidates in spec.lines]


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased at the start (TensorBoard's smoothing)."""
    out, last = [], 0.0
    for count, value in enumerate(values, 1):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**count))
    return out


def x_range(store: Store, run: str, names: list[str], options: ViewOptions) -> tuple[float, float]:
    """The x range the charts of a run share: the whole run, or its last ``window`` steps."""
    low, high = math.inf, -math.inf
    for (r, _rank, name), series in store.series.items():
        if r != run or name not in names or not len(series):
            continue
        keys = series.times if options.by_time else series.steps
        low, high = min(low, keys[0]), max(high, keys[-1])
    if low > high:
        return 0.0, 1.0
    if options.window and not options.by_time:
        low = max(low, high - options.window)
    return low, max(high, low + 1)


def picture(
    store: Store,
    run: str,
    spec: ChartSpec,
    options: ViewOptions,
    ncols: int,
    config: Mapping[str, Any] | None = None,
    alert_steps: list[int] | None = None,
    origin: float | None = None,
    events: list[float] | None = None,
) -> Picture:
    """Computes what one chart shows: min/max per column from the full series, never sampled.

    ``events``: the x (step, or wall time with ``options.by_time``) of the run's events.
    """
    picked = resolve(spec, store.metrics.get(run, set()))
    found = [m for m in picked if m is not None]
    pic = Picture(title=inert(spec.title))
    if not found:
        return pic
    pic.x_low, pic.x_high = x_low, x_high = x_range(store, run, found, options)
    pic.x_origin = x_low if origin is None else min(origin, x_low)
    width = (x_high - x_low) / max(ncols, 1)
    for index, metric in enumerate(picked):
        if metric is None:
            continue
        label = (
            spec.labels[index] if index < len(spec.labels) and spec.labels[index] else inert(metric)
        )
        ranks = store.ranks(run, metric)
        if options.rank_mode == "one":
            # A metric only some ranks publish (eval loss, from the main process) stays visible.
            chosen = [r for r in ranks if r == options.rank]
            if not chosen and ranks:
                label = f"{label} r{ranks[0]}"
            ranks = chosen or ranks[:1]
        per_rank: dict[int, Columns] = {}
        for rank in ranks:
            series = store.get(run, rank, metric)
            if series is not None:
                per_rank[rank] = series.columns(x_low, x_high, ncols, by_time=options.by_time)
        for cols in per_rank.values():
            pic.marks.extend((x, "nan" if v != v else "inf") for x, v in cols.nonfinite)
        if options.rank_mode == "band" and len(per_rank) > 1:
            _band(pic, per_rank, label, index, x_low, width, options)
        else:
            for rank, cols in per_rank.items():
                name = label if len(per_rank) == 1 else f"{label} r{rank}"
                _envelope(pic, cols, name, line_color(rank, index), options)
    threshold = metrics.max_grad_norm(config or {})
    if spec.key == "grad_norm" and threshold is not None:
        pic.hlines.append((threshold, "clip"))
        pic.note = _clipped_share(store, run, found[0], threshold)
        _include(pic, [threshold], options)
    if alert_steps and not options.by_time:
        pic.marks.extend((float(s), "alert") for s in alert_steps if x_low <= s <= x_high)
    if events:
        pic.marks.extend((x, "event") for x in events if x_low <= x <= x_high)
    return pic


def _include(pic: Picture, values: list[float], options: ViewOptions) -> None:
    finite = [v for v in values if v - v == 0.0 and (v > 0 or not options.log_y)]
    if finite:
        pic.y_low, pic.y_high = min(pic.y_low, *finite), max(pic.y_high, *finite)


def _envelope(pic: Picture, cols: Columns, label: str, color: str, options: ViewOptions) -> None:
    """The raw series as each column's min and max (faint when smoothed), then the smoothed one."""
    if not cols.x:
        return
    x: list[float] = []
    y: list[float] = []
    for cx, low, high in zip(cols.x, cols.low, cols.high):
        if low == high:
            x.append(cx)
            y.append(low)
        else:
            x += [cx, cx]
            y += [low, high]
    _include(pic, cols.low + cols.high, options)
    smoothing = options.smoothing > 0 and len(cols.mean) > 2
    pic.lines.append(Line(label, x, y, color, faint=smoothing, marker="dot"))
    if smoothing:
        pic.lines.append(
            Line(f"{label} (smoothed)", list(cols.x), smooth(cols.mean, options.smoothing), color)
        )


def _band(
    pic: Picture,
    per_rank: dict[int, Columns],
    label: str,
    index: int,
    x_low: float,
    width: float,
    options: ViewOptions,
) -> None:
    """Min, median and max across ranks, per column (of each rank's column mean)."""
    by_col: dict[int, list[float]] = {}
    extremes: list[float] = []
    for cols in per_rank.values():
        for col, mean in zip(cols.col, cols.mean):
            by_col.setdefault(col, []).append(mean)
        extremes += cols.low + cols.high
    order = sorted(by_col)
    x = [x_low + (c + 0.5) * width for c in order]
    color = line_color(0, index)
    pic.lines.append(Line(f"{label} min", x, [min(by_col[c]) for c in order], color, faint=True))
    pic.lines.append(
        Line(f"{label} median", x, [statistics.median(by_col[c]) for c in order], color)
    )
    pic.lines.append(Line(f"{label} max", x, [max(by_col[c]) for c in order], color, faint=True))
    _include(pic, extremes, options)


def _clipped_share(store: Store, run: str, metric: str, threshold: float, last: int = 1000) -> str:
    """The share of the last ``last`` optimizer steps whose grad norm was above the threshold.

    One rank's series is counted: a data-parallel grad norm is all-reduced, the same on every
    rank, and counting every rank's copy would count rank-steps, not steps.
    """
    ranks = store.ranks(run, metric)
    series = store.get(run, ranks[0], metric) if ranks else None
    if series is None or not len(series):
        return ""
    values = series.values[-last:]
    clipped = sum(1 for v in values if v > threshold)
    return f"clipped {100 * clipped / len(values):.0f}% of last {len(values)} steps"


def draw(
    plt: Any,
    pic: Picture,
    options: ViewOptions,
    color: bool = True,
    size: tuple[int, int] = (80, 12),
) -> tuple[Axis, Axis]:
    """Hands a picture to a plotext object (textual-plotext's ``plt``) ``size`` cells big.

    Returns the (x, y) ticks it set: lmtop's own, which fit the size (see :mod:`.axes`).
    """
    plt.clear_data()
    plt.clear_figure()
    if pic.empty:
        plt.title("no data yet")
        return Axis(), Axis()
    # No legend inside the plot: it would cover data (a spike, a NaN mark). The chart's border
    # title names the lines instead, and with many ranks the colours match the ranks table.
    log = options.log_y and pic.y_low > 0

    low, high = pic.y_low, pic.y_high
    if log:
        low, high = math.log10(low), math.log10(high)
    if high <= low:
        high = low + (abs(low) * 0.1 or 1.0)
    # plotext draws in data units and overflows near the float's end (finite values ±1e308
    # apart): such a chart is drawn scaled into [-1, 1], its ticks labelled with the real values.
    big = max(abs(low), abs(high))
    shrink = 1.0 if big < 1e300 else 1.0 / big

    def y_of(values: list[float]) -> list[float]:
        if log:
            return [math.log10(v) if v > 0 else math.nan for v in values]
        return values if shrink == 1.0 else [v * shrink for v in values]

    real_low, real_high = low, high
    low, high = low * shrink, high * shrink
    # Events: a ▲ on the bottom edge, drawn first, so that the data drawn after it is never
    # hidden by one.
    happened = [x for x, why in pic.marks if why == "event"]
    if happened:
        plt.scatter(
            happened, [low] * len(happened), marker="▲", **({"color": EVENT_COLOR} if color else {})
        )
    for line in pic.lines:
        points = [(x, y) for x, y in zip(line.x, y_of(line.y)) if y - y == 0.0]
        if not points:
            continue
        xs, ys = zip(*points)
        kwargs: dict[str, Any] = {"marker": line.marker}
        if color:
            kwargs["color"] = "gray" if line.faint else line.color
        plt.plot(list(xs), list(ys), **kwargs)
    for y, _why in pic.hlines:
        plt.hline(math.log10(y) if log else y * shrink, NAN_COLOR if color else None)
    # Alert steps: a yellow ▼ on the top edge only, so that a run with many alerts stays
    # readable. NaN/Inf steps: a red line through the plot and an x on top, as the value has no
    # y; drawn after the ▼, so that an alert on a NaN step leaves the x showing.
    alerted = [x for x, why in pic.marks if why == "alert"]
    if alerted:
        plt.scatter(
            alerted, [high] * len(alerted), marker="▼", **({"color": ALERT_COLOR} if color else {})
        )
    bad = [x for x, why in pic.marks if why in ("nan", "inf")]
    for at in bad:
        plt.vline(at, NAN_COLOR if color else None)
    if bad:
        plt.scatter(bad, [high] * len(bad), marker="x", **({"color": NAN_COLOR} if color else {}))
    plt.ylim(low, high)
    plt.xlim(pic.x_low, pic.x_high)
    width, height = size
    y_ticks = axes.y_axis(real_low, real_high, axes.plot_rows(height), log=log)
    origin = pic.x_origin if options.by_time else None
    x_ticks = axes.x_axis(pic.x_low, pic.x_high, axes.plot_columns(width, y_ticks), origin)
    plt.yticks([v * shrink for v in y_ticks.values], y_ticks.labels)
    plt.xticks(x_ticks.values, x_ticks.labels)
    return x_ticks, y_ticks
