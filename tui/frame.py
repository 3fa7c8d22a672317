"""What one frame shows, computed from a run's snapshot and the store: the header line, the ranks
table's rows and the charts' pictures. Plain functions, called with the store's lock held; the
widgets then draw the results."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.text import Text

from . import compare, metrics, numbers
from .charts import ChartSpec, Picture, ViewOptions, picture
from .runbook import RunView
from .store import Store
from .system import SystemView
from .text import inert
from .widgets import Chart, RankRow, RunRow

STATE_COLORS = {
    "live": "green",
    "reading": "cyan",
    "finished": "blue",
    "failed": "red",
    "crashed": "bold red",
    "stalled": "yellow",
}


def last_value(store: Store, key: str, rank: int, names: tuple[str, ...]) -> float | None:
    """The latest value of the first of ``names`` the rank publishes."""
    for name in names:
        series = store.get(key, rank, name)
        if series is not None and len(series):
            return series.last
    return None


def any_rank_value(store: Store, run: RunView, names: tuple[str, ...]) -> float | None:
    """The latest value of the first rank that publishes one of ``names`` (the eval loss, which
    only the main process may publish; the epoch)."""
    for rank in run.ranks:
        value = last_value(store, run.key, rank.rank, names)
        if value is not None:
            return value
    return None


def step_time(store: Store, key: str, rank: int, measured: float | None) -> float | None:
    """Seconds per step of a rank: its ``step_time`` metric, else its measured pace."""
    return last_value(store, key, rank, metrics.STEP_TIME_NAMES) or measured


def rank_rows(store: Store, run: RunView, now_wall: float) -> list[RankRow]:
    """Per-rank figures; the state is the run book's health (the alerts' rules)."""
    leader = run.last_step
    return [
        RankRow(
            rank=r.rank,
            step=r.last_step,
            step_time=step_time(store, run.key, r.rank, r.step_seconds),
            lag=leader - r.last_step if leader is not None and r.last_step is not None else None,
            memory=last_value(store, run.key, r.rank, metrics.MEMORY_GB_NAMES),
            seen=now_wall - r.last_t if r.last_t and not r.done else None,
            state=r.health,
        )
        for r in run.ranks
    ]


def header_text(
    store: Store, run: RunView | None, runs: int, now_wall: float, extra: dict[str, Any]
) -> Text:
    """The header line: run, host, state, alerts, elapsed, step/total and ETA, epoch, world,
    counters: the most urgent first, as a narrow terminal cuts the end. ``extra``: the app's
    counters (alerts, bad live frames, paused, reading: a history is being read)."""
    text = Text(no_wrap=True, overflow="ellipsis")
    if run is None:
        text.append("lmtop", style="bold")
        why = extra.get("nothing")
        if why:
            text.append(f"  nothing to show: {inert(why, 300)}", style="yellow")
        else:
            text.append(
                "  waiting for a run… (start a training job that calls lmtop.hooks.publish)"
            )
        return text
    state = run.state
    first_t, last_t, step = run.started, run.last_t, run.last_step
    if state == "live" and extra.get("reading") and (last_t is None or now_wall - last_t > 60):
        # Its files are still being read, and what was read is old: a finished run is "live"
        # until its ranks' end messages are, and its time would count to now (9 h for last
        # night's run). A live run whose ranks outgrow a poll's read (hundreds of them) has
        # recent messages: it stays live.
        state = "reading"
    text.append(inert(run.name, 60), style="bold")
    if runs > 1:
        text.append(f" ({runs} runs)")
    text.append(f"  {inert(run.info.get('host', '?'), 30)}  ")
    text.append(f" {state} ", style=f"reverse {STATE_COLORS.get(state, '')}")
    # What must be seen at 80 columns first (the line is cut at the terminal's edge).
    alerts = extra.get("alerts", 0)
    if alerts:
        critical = extra.get("critical", 0)
        text.append(
            f"  ⚠ {alerts} alert{'s' * (alerts != 1)}",
            style="bold red" if critical else "bold yellow",
        )
    if extra.get("paused"):
        text.append("  PAUSED", style="reverse")
    live = state in ("live", "stalled")
    if first_t and last_t:
        text.append(f"  {numbers.duration((now_wall if live else last_t) - first_t)}")
    if step is not None:
        total = metrics.total_steps(run.config)
        text.append(f"  step {numbers.step(step)}" + (f"/{numbers.step(total)}" if total else ""))
        rank0 = run.ranks[0] if run.ranks else None
        seconds = step_time(store, run.key, rank0.rank, rank0.step_seconds) if rank0 else None
        if total and seconds and state == "live" and step < total:
            text.append(f" ETA {numbers.duration((total - step) * seconds)}")
    epoch = any_rank_value(store, run, metrics.EPOCH_NAMES)
    if epoch is not None and math.isfinite(epoch):
        text.append(f"  epoch {epoch:.2f}")
    text.append(f"  world {run.world}")
    dropped, bad = run.dropped, run.bad_lines + extra.get("bad_live", 0)
    text.append(f"  dropped {dropped}", style="yellow" if dropped else "dim")
    text.append(f"  bad {bad}", style="yellow" if bad else "dim")
    backwards = store.backwards.get(run.key, 0)
    if backwards:
        text.append(f"  {backwards} points whose step went back", style="yellow")
    return text


def pictures(
    store: Store,
    run: RunView,
    charts: list[tuple[Chart, ChartSpec, int]],
    options: ViewOptions,
    alerted: list[tuple[str | None, int]],
    runs: tuple[RunView, ...] = (),
) -> list[tuple[Chart, Picture]]:
    """The picture of each visible chart (with its spec and width in columns, read from the
    widget before the store's lock is taken), with the alert marks of its metrics; with
    ``options.compare``, every one of ``runs`` overlaid, ``run`` on top."""
    out = []
    compared = compared_runs(runs, options, run)
    events = event_marks(run, options.by_time)  # the same on every chart
    for chart, spec, columns in charts:
        if compared:
            each = [
                (
                    inert(r.name, 40),
                    picture(store, r.key, spec, options, columns, r.config),
                    (r.started or 0.0) if options.by_time else 0.0,
                )
                for r in compared
            ]
            pinned = next(i for i, r in enumerate(compared) if r.key == run.key)
            out.append((chart, compare.overlay(each, pinned)))
            continue
        names = {name for line in spec.lines for name in line}
        steps = [step for metric, step in alerted if metric in names]
        pic = picture(
            store, run.key, spec, options, columns, run.config, steps, run.started, events
        )
        out.append((chart, pic))
    return out


def compared_runs(runs: tuple[RunView, ...], options: ViewOptions, shown: RunView) -> list[RunView]:
    """The runs overlaid (``o``), oldest first: the order of their colours. Those marked in the
    run picker when any are, and the run shown; else every run."""
    if options.overlaid:
        runs = tuple(r for r in runs if r.key in options.overlaid or r.key == shown.key)
    return sorted(runs, key=recency) if options.compare and len(runs) > 1 else []


DIFF_COLUMNS = 6  # config keys that differ, shown in the runs table


def run_rows(store: Store, runs: list[RunView], shown: RunView) -> tuple[list[RunRow], list[str]]:
    """The runs table (``o``): one row per run overlaid, in its colour, and the config keys
    whose values differ between the runs, what a sweep varied first."""
    keys = compare.config_diff([r.config for r in runs])[:DIFF_COLUMNS]
    rows = []
    for index, run in enumerate(runs):
        flat = compare.flatten(run.config)
        first = run.ranks[0].rank if run.ranks else 0
        rows.append(
            RunRow(
                name=run.name,
                color=compare.RUN_COLORS[index % len(compare.RUN_COLORS)],
                pinned=run.key == shown.key,
                state=run.state,
                step=run.last_step,
                loss=last_value(store, run.key, first, metrics.LOSS_NAMES),
                eval_loss=any_rank_value(store, run, metrics.EVAL_LOSS_NAMES),
                config=[config_value(flat[k]) if k in flat else "-" for k in keys],
            )
        )
    return rows, keys


def event_marks(run: RunView, by_time: bool) -> list[float]:
    """Where the run's events lie on an x axis of steps, or of wall time."""
    if by_time:
        return [e.t for e in run.events]
    return [float(e.step) for e in run.events if e.step is not None]


def recency(run: RunView) -> tuple[float, float]:
    """How new a run is: its start, then its latest message (runs started together)."""
    return (run.started or 0.0, run.last_t or 0.0)


def run_label(run: RunView) -> str:
    """A run in the run picker: its name, state, ranks and directory."""
    where = f"  {inert(str(run.dir.parent), 40)}" if run.dir is not None else ""
    return f"{inert(run.name, 50)}  {run.state}  {len(run.ranks)} ranks{where}"


GIB = float(1 << 30)
HOT_C = 85.0  # GPU temperature from which it is shown in yellow (most throttle near 87-90 C)
FULL = 0.95  # share of memory in use from which it is shown in yellow


def system_text(view: SystemView, rows: int) -> Text:
    """The system panel: host CPU and memory, then a line per GPU, or, when the GPUs do not
    fit in ``rows`` lines, one line over all of them (the worst figures)."""
    text = Text(no_wrap=True, overflow="ellipsis")
    cpu = "-" if view.cpu is None else f"{view.cpu:.0f}%"
    text.append(f"cpu  {cpu} of {view.cores}")
    if view.load is not None:
        text.append(f"  load {view.load:.1f}", style="dim")
    if view.mem_total:
        used = view.mem_used
        text.append("\nmem  ")
        style = "yellow" if used is not None and used >= FULL * view.mem_total else ""
        text.append(f"{_gib(used)}/{_gib(view.mem_total)}", style=style)
    gpus = view.gpus
    if gpus and len(gpus) <= rows - 2:
        for gpu in gpus:
            text.append(f"\ngpu{gpu.index} ")
            _gpu_figures(text, [gpu.util], [gpu.mem_used], [gpu.mem_total], [gpu.power], [gpu.temp])
    elif gpus:
        utils = [g.util for g in gpus if g.util is not None]
        text.append(f"\n{len(gpus)} GPUs ")
        text.append(f"util min {min(utils):.0f}% " if utils else "")
        _gpu_figures(
            text,
            [sum(utils) / len(utils)] if utils else [None],
            [g.mem_used for g in gpus],
            [g.mem_total for g in gpus],
            [g.power for g in gpus],
            [g.temp for g in gpus],
            every=True,
        )
    return text


def _gpu_figures(
    text: Text,
    util: list[float | None],
    used: list[float | None],
    total: list[float | None],
    power: list[float | None],
    temp: list[float | None],
    every: bool = False,
) -> None:
    """A GPU's figures (or, with ``every``, the mean utilisation, the fullest memory, the power
    of all and the hottest of several): utilisation, memory, power, temperature."""
    if util[0] is not None:
        text.append(f"{'avg ' if every else ''}{util[0]:3.0f}% ")
    fullest = max(
        ((u, t) for u, t in zip(used, total) if u is not None and t),
        key=lambda ut: ut[0] / ut[1],
        default=None,
    )
    if fullest is not None:
        u, t = fullest
        text.append(
            f"{'max ' if every else ''}{_gib(u)}/{_gib(t)} ", style="yellow" * (u >= FULL * t)
        )
    watts = [w for w in power if w is not None]
    if watts:
        text.append(f"{numbers.number(sum(watts), 3)}W ")
    hottest = max((c for c in temp if c is not None), default=None)
    if hottest is not None:
        text.append(f"{hottest:.0f}°C", style="yellow" * (hottest >= HOT_C))


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f}G"


def now() -> float:
    """Wall-clock time (the publishers' clock in messages is wall time too)."""
    return time.time()


def alert_line(alert: Any) -> str:
    """An alert in a list: severity, step, rank and the start of what happened."""
    step = "-" if alert.step is None else numbers.step(alert.step)
    return f"{alert.severity[:4].upper():<5}step {step:<7}rank {alert.rank:<4}{inert(alert.message, 70)}"


CONTEXT_STEPS = 50  # an alert's page shows its metric this many steps either side
BARS = "▁▂▃▄▅▆▇█"


def alert_context(store: Store, alert: Any) -> Text:
    """The alert's metric on its rank, ±CONTEXT_STEPS steps around it: a bar per step (a
    column's max where several points share one, so no spike is hidden), the alert's step
    under a ``^``, the window's min and max. Empty for an alert without a metric or step (a
    stall, a crash)."""
    text = Text(no_wrap=True, overflow="crop")
    if alert.metric is None or alert.step is None:
        return text
    series = store.get(alert.key, alert.rank, alert.metric)
    if series is None or not len(series):
        return text
    lo, hi = alert.step - CONTEXT_STEPS, alert.step + CONTEXT_STEPS
    width = hi - lo + 1
    cols = series.columns(lo, hi, width)  # a column per step: where the charts' columns fall
    if not cols.x and not cols.nonfinite:
        return text
    low, high = min(cols.low, default=0.0), max(cols.high, default=1.0)
    # Finite values ±1e308 apart have an infinite span: measured in halves then.
    half = 1.0 if math.isfinite(high - low) else 0.5
    span = (high * half - low * half) or 1.0
    bars = [" "] * width
    for x, top in zip(cols.x, cols.high):  # x is a step: its bar is at its place
        bars[min(width - 1, max(0, round(x - lo)))] = BARS[
            min(len(BARS) - 1, int((top * half - low * half) / span * len(BARS)))
        ]
    for x, _ in cols.nonfinite:
        bars[min(width - 1, max(0, round(x - lo)))] = "x"
    text.append(f"\n{inert(alert.metric, 40)} on rank {alert.rank}, steps {max(0, lo)}-{hi}\n")
    text.append("".join(bars) + "\n")
    text.append(" " * (alert.step - lo) + f"^ step {alert.step}\n", style="yellow")
    text.append(f"min {numbers.number(low)}  max {numbers.number(high)}", style="dim")
    if cols.x:
        text.append(f" at step {int(cols.x[cols.high.index(high)])}", style="dim")
    if cols.nonfinite:
        text.append(f"  NaN/Inf at {len(cols.nonfinite)} points", style="red")
    return text


RUN_EVENTS_SHOWN = 200  # the newest events the run's page lists


def run_text(run: RunView) -> Text:
    """A run's page: where it ran, its config (every key, sorted) and its events, newest first."""
    text = Text()
    info = run.info
    rows = [
        ("run", inert(run.name, 200)),
        ("folder", "-" if run.dir is None else inert(str(run.dir), 300)),
        ("state", run.state),
        ("ranks", f"{len(run.ranks)} of {run.world}"),
        ("host", inert(str(info.get("host", "-")), 100)),
        ("command", inert(" ".join(map(str, info.get("argv") or [])) or "-", 300)),
        ("launch", inert(str(info.get("launch", "-")), 100)),
    ]
    if run.started:
        rows.append(("started", clock(run.started)))
    for name, value in rows:
        text.append(f"{name:<9}", style="dim")
        text.append(f"{value}\n")
    text.append("\nconfig\n", style="bold")
    if not run.config:
        text.append("  none recorded (hooks.init(config=...) records one)\n", style="dim")
    width = min(32, max((len(inert(str(k), 32)) for k in run.config), default=0))
    for key in sorted(run.config, key=str):
        text.append(f"  {inert(str(key), 32):<{width}}  ", style="dim")
        text.append(f"{config_value(run.config[key])}\n")
    events = run.events[-RUN_EVENTS_SHOWN:]
    title = f"events, newest first ({len(events)} of {len(run.events)})"
    text.append(
        f"\n{title if len(events) < len(run.events) else 'events, newest first'}\n", style="bold"
    )
    if not events:
        text.append("  none yet (evaluations, checkpoints, hooks.event(...))\n", style="dim")
    for event in reversed(events):
        when = clock(event.t, "%H:%M:%S")
        ranks = "" if len(run.ranks) < 2 else f"  ranks {ranks_text(event.ranks)}"
        text.append(f"  step {numbers.step(event.step):<7} {when}  ", style="dim")
        text.append(inert(event.text, 200))
        text.append(f"{ranks}\n", style="dim")
    return text


def clock(t: float, form: str = "%Y-%m-%d %H:%M:%S") -> str:
    """A publisher's wall time in the local zone; "-" for one no calendar holds (a line's ``t``
    is any finite number: 1e20 is one)."""
    try:
        return time.strftime(form, time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return "-"


def config_value(value: Any) -> str:
    """A config value on one line: numbers as people read them, the rest cut at 80 characters."""
    if isinstance(value, float):
        return numbers.number(value)
    return inert(value if isinstance(value, str) else repr(value), 80)


def ranks_text(ranks: tuple[int, ...]) -> str:
    """``0,1,2,5`` as ``0-2,5``."""
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def alert_text(alert: Any) -> Text:
    """An alert in full: what happened, where, the value against its baseline, when."""
    text = Text()
    text.append(inert(alert.message, 2000) + "\n\n", style="bold")
    rows = [
        ("type", alert.type),
        ("run", inert(alert.run, 200)),
        ("rank", str(alert.rank)),
        ("metric", "-" if alert.metric is None else inert(alert.metric, 200)),
        ("step", "-" if alert.step is None else str(alert.step)),
        (
            "value",
            "-" if alert.value is None else f"{alert.value!r} ({numbers.number(alert.value)})",
        ),
        (
            "baseline",
            "-"
            if alert.baseline is None
            else f"{alert.baseline!r} ({numbers.number(alert.baseline)})",
        ),
        (
            "at",
            "-" if alert.t is None else clock(alert.t),
        ),
    ]
    for name, value in rows:
        text.append(f"{name:<9}", style="dim")
        text.append(f"{value}\n")
    return text
