"""Charts never hide a spike: min/max per column from the full series, NaN marked."""

from __future__ import annotations

import math
import random
import re

import pytest
from lmtop.tui.charts import DEFAULT_CHARTS, ViewOptions, draw, picture
from lmtop.tui.store import Series, Store
from textual_plotext.plot import Plot

STEPS = 1_000_000
SPIKE_AT = 654_321
NAN_AT = 123_457
COLUMNS = 150


def million_steps() -> Store:
    rng = random.Random(7)
    store = Store()
    series = store.series[("run", 0, "loss")] = Series()
    store.metrics["run"] = {"loss"}
    chunk = 100_000
    for start in range(0, STEPS, chunk):
        steps = list(range(start, start + chunk))
        values = [1.0 + rng.random() * 0.05 for _ in steps]
        for i, step in enumerate(steps):
            if step == SPIKE_AT:
                values[i] = 50.0
            elif step == NAN_AT:
                values[i] = math.nan
        series.extend(steps, [float(s) for s in steps], values)
    return store


def test_a_single_spike_in_a_million_steps_is_drawn() -> None:
    store = million_steps()
    loss = next(spec for spec in DEFAULT_CHARTS if spec.key == "loss")
    options = ViewOptions(smoothing=0.0)
    pic = picture(store, "run", loss, options, COLUMNS)
    assert pic.y_high == 50.0, "the y range reaches the spike"
    (line,) = pic.lines
    column = STEPS / COLUMNS
    at_spike = [x for x, y in zip(line.x, line.y) if y == 50.0]
    assert len(at_spike) == 1 and abs(at_spike[0] - SPIKE_AT) <= column, (
        "a mark at the spike's column"
    )

    values = store.series[("run", 0, "loss")].values
    every_nth = values[:: int(column)]
    assert max(v for v in every_nth if v == v) < 2.0, "taking every n-th point would have missed it"

    plot = Plot()
    plot.plotsize(COLUMNS // 2 + 12, 20)
    draw(plot, pic, options, color=False, size=(COLUMNS // 2 + 12, 20))
    assert "50" in plot.build().splitlines()[1], "the top of the drawn y axis is the spike"


def test_a_single_nan_in_a_million_steps_is_marked() -> None:
    store = million_steps()
    loss = next(spec for spec in DEFAULT_CHARTS if spec.key == "loss")
    pic = picture(store, "run", loss, ViewOptions(), COLUMNS)
    assert [(x, why) for x, why in pic.marks] == [(NAN_AT, "nan")]
    values = store.series[("run", 0, "loss")].values
    assert all(v == v for v in values[:: STEPS // COLUMNS]), "sampling would not have seen it"
    plot = Plot()
    plot.plotsize(100, 20)
    draw(plot, pic, ViewOptions(), color=False)
    canvas = re.sub(r"\x1b\[[0-9;]*m", "", plot.build())
    assert sum(row.count("x") for row in canvas.splitlines()[1:-2]) >= 1, "a visible ✕ marker"


def test_smoothing_is_drawn_over_the_raw_series_never_instead() -> None:
    store = million_steps()
    loss = next(spec for spec in DEFAULT_CHARTS if spec.key == "loss")
    pic = picture(store, "run", loss, ViewOptions(smoothing=0.9), COLUMNS)
    raw, smoothed = pic.lines
    assert raw.faint and not smoothed.faint and max(raw.y) == 50.0
    assert max(smoothed.y) < 50.0


def test_log_scale_labels_powers_of_ten() -> None:
    store = Store()
    series = store.series[("run", 0, "learning_rate")] = Series()
    store.metrics["run"] = {"learning_rate"}
    series.extend(
        list(range(100)), [float(i) for i in range(100)], [10 ** (-6 + i / 25) for i in range(100)]
    )
    lr = next(spec for spec in DEFAULT_CHARTS if spec.key == "lr")
    options = ViewOptions(log_y=True, smoothing=0.0)
    pic = picture(store, "run", lr, options, 80)
    plot = Plot()
    plot.plotsize(60, 15)
    draw(plot, pic, options, color=False, size=(60, 15))
    text = plot.build()
    assert "1e-6" in text and "1e-3" in text
    draw(
        plot, pic, options, color=False, size=(60, 15)
    )  # plotext #209: a rebuild must not break the scale
    assert plot.build() == text


def test_frame_work_does_not_grow_with_the_series() -> None:
    """Decimating 10x more points costs about the same (block pyramid), measured in one run."""
    import time

    small, big = Series(), Series()
    small.extend(list(range(100_000)), [0.0] * 100_000, [1.0] * 100_000)
    big.extend(list(range(1_000_000)), [0.0] * 1_000_000, [1.0] * 1_000_000)

    def cost(series: Series) -> float:
        started = time.perf_counter()
        for _ in range(20):
            series.columns(0, len(series) - 1, 300)
        return time.perf_counter() - started

    # The least of several tries each, taken in turns: one try is at the mercy of a collection
    # or a neighbour's burst on a shared machine (a single pair read 4.2x once, 1.9-2.4x at best).
    small_costs, big_costs = [], []
    for _ in range(5):
        small_costs.append(cost(small))
        big_costs.append(cost(big))
    assert min(big_costs) < 3 * min(small_costs)


def test_compacted_styles_look_the_same_in_far_fewer_runs() -> None:
    from lmtop.tui.widgets import compact_styles
    from rich.style import Style
    from rich.text import Text

    store = million_steps()
    loss = next(spec for spec in DEFAULT_CHARTS if spec.key == "loss")
    options = ViewOptions(smoothing=0.6)
    pic = picture(store, "run", loss, options, 60)
    plot = Plot()
    plot.plotsize(72, 20)
    draw(plot, pic, options, color=True)
    before = Text.from_ansi(plot.build())
    after = compact_styles(before)

    def cells(text: Text) -> list[Style]:
        styles = [Style()] * len(text.plain)
        for span in text.spans:
            for i in range(span.start, span.end):
                styles[i] = Style.parse(span.style) if isinstance(span.style, str) else span.style
        return styles

    assert after.plain == before.plain
    for char, old, new in zip(before.plain, cells(before), cells(after)):
        if char == "\n":
            continue
        if char == " ":
            assert old.bgcolor == new.bgcolor, (old, new)
        else:
            assert old == new, (char, old, new)
    assert len(after.spans) < 0.6 * len(before.spans), (len(before.spans), len(after.spans))


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plot_labels(text: str) -> tuple[list[str], list[str]]:
    """The x labels (the last line) and the y labels (left of ┤, or ├ on a threshold line)."""
    lines = [ANSI.sub("", line) for line in text.splitlines()]
    y = [re.split("[┤├]", line)[0].strip() for line in lines if re.search("[┤├]", line)]
    return lines[-1].split(), [label for label in y if label]


def throughput_store(steps: int = 470, start: float = 1_796_011_000.0) -> Store:
    """The issue's run: throughput near 655k tok/s, lr 3e-4 to 2e-6, loss 2.8 to 0.5."""
    store = Store()
    names = {"tokens_per_second", "learning_rate", "loss"}
    store.metrics["run"] = names
    for name in names:
        series = store.series[("run", 0, name)] = Series()
        values = {
            "tokens_per_second": [655_348.3 - 64_188 * (i % 3) for i in range(steps)],
            "learning_rate": [3e-4 * (1 - i / steps) + 2e-6 for i in range(steps)],
            "loss": [0.5 + 2.3 * math.exp(-i / 80) for i in range(steps)],
        }[name]
        series.extend(list(range(steps)), [start + 1.5 * i for i in range(steps)], values)
    return store


@pytest.mark.parametrize("log_y", [False, True])
@pytest.mark.parametrize("by_time", [False, True])
def test_ticks_read_like_numbers_and_never_run_together(log_y: bool, by_time: bool) -> None:
    store = throughput_store()
    options = ViewOptions(log_y=log_y, by_time=by_time, smoothing=0.0)
    for spec in DEFAULT_CHARTS[:4]:
        if spec.key == "grad_norm":
            continue
        for width, height in [(28, 6), (38, 8), (58, 10), (78, 18), (130, 30), (200, 40)]:
            pic = picture(store, "run", spec, options, width - 8, origin=1_796_011_000.0)
            plot = Plot()
            plot.plotsize(width, height)
            plot._set_size(width, height)
            x, y = draw(plot, pic, options, color=False, size=(width, height))
            xs, ys = plot_labels(plot.build())
            where = f"{spec.key} at {width}x{height}"
            # Every label printed whole, apart from its neighbours, in the order set.
            assert xs == x.labels and len(x.labels) >= 2, where
            assert ys == list(reversed(y.labels)) and len(y.labels) >= 2, where
            for label in xs + ys:
                assert re.fullmatch(r"[+-]?[0-9.]+(e-?\d+|[kMGT]|[smhd]|[0-9hms]*)?", label), label
            if by_time:
                assert xs[0].startswith("+") and "1796" not in " ".join(xs), where
            else:
                assert all("." not in label for label in xs), where  # steps are integers
            if spec.key == "throughput" and not log_y:
                assert all(label.endswith("k") or label == "0" for label in ys), where
            if spec.key == "lr" and not log_y:
                assert any(label.endswith("e-4") for label in ys), where


def test_colours_match_between_lines_legend_table_and_help() -> None:
    from lmtop.tui.charts import ALERT_COLOR, PLOTEXT_ANSI, RANK_COLORS, rich_color
    from lmtop.tui.screens import LEGEND
    from rich.color import Color

    store = Store()
    store.metrics["run"] = {"loss", "eval_loss"}
    for rank in range(4):
        series = store.series[("run", rank, "loss")] = Series()
        series.extend(list(range(50)), [float(s) for s in range(50)], [2.0 - rank * 0.1] * 50)
    series = store.series[("run", 0, "eval_loss")] = Series()
    series.extend([9, 19, 29], [9.0, 19.0, 29.0], [2.5, 2.4, 2.3])
    loss = next(spec for spec in DEFAULT_CHARTS if spec.key == "loss")
    options = ViewOptions(smoothing=0.0)
    pic = picture(store, "run", loss, options, 60, alert_steps=[25])
    plot = Plot()
    plot.plotsize(70, 16)
    draw(plot, pic, options, color=True, size=(70, 16))
    text = plot.build()
    drawn = {int(code) for code in re.findall(r"38;5;(\d+)m[⠁-⣿•]", text)}
    legend = dict(pic.legend())
    # The legend's swatches are the lines' colours: four ranks of train, and eval in its own.
    assert [PLOTEXT_ANSI[c] for c in legend["train"]] == [PLOTEXT_ANSI[c] for c in RANK_COLORS[:4]]
    assert {PLOTEXT_ANSI[c] for c in legend["train"] + legend["eval"]} == drawn
    assert not set(legend["eval"]) & set(legend["train"])
    # The ranks table's Rich colour is the terminal colour plotext printed (rank 1 had none).
    for name in RANK_COLORS:
        assert Color.parse(rich_color(name)).number == PLOTEXT_ANSI[name]
    # The help says the alert mark is yellow: ANSI 11 is bright yellow.
    assert re.search(rf"38;5;{PLOTEXT_ANSI[ALERT_COLOR]}m▼", text) and "yellow ▼" in LEGEND
    assert Color.parse(rich_color(ALERT_COLOR)).number == Color.parse("bright_yellow").number


def test_an_alert_on_a_nan_step_leaves_the_nan_mark_showing() -> None:
    store = Store()
    store.metrics["run"] = {"loss"}
    series = store.series[("run", 0, "loss")] = Series()
    values = [1.0] * 100
    values[50] = math.nan
    series.extend(list(range(100)), [float(s) for s in range(100)], values)
    loss = next(spec for spec in DEFAULT_CHARTS if spec.key == "loss")
    pic = picture(store, "run", loss, ViewOptions(), 60, alert_steps=[50])
    plot = Plot()
    plot.plotsize(70, 12)
    draw(plot, pic, ViewOptions(), color=False, size=(70, 12))
    top = ANSI.sub("", plot.build()).splitlines()[1]
    assert "x" in top and "▼" not in top
