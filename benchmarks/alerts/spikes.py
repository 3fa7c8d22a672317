"""Spike detectors side by side on real training traces: recall, false alarms, delay, cost.

    .venv/bin/python benchmarks/alerts/spikes.py            # the tables (Markdown), 1-3 min
    .venv/bin/python benchmarks/alerts/spikes.py --tails    # only each family's measured tail

The traces are real trainings, untouched: ``real_runs.tar.xz`` (``make_real_runs.py``: tiny
Llama fine-tunes and an MLP, 3000 optimizer steps each) and ``clean_runs.tar.xz``
(``make_clean_runs.py``: a 2-layer transformer LM and the same MLP). Each detector is fed one
series (the training loss or the pre-clip grad norm) of one run, value by value, as lmtop's engine
feeds its detectors. The detectors:

- ``lmtop old``: ``SpikeDetector`` with the default settings (every finding is a warning);
- ``lmtop new``: ``TailSpikeDetector`` with the default settings (its severity hint);
- ``Lightning``: ``lightning.fabric.utilities.spike.SpikeDetection`` defaults, its rule
  re-implemented here: after one warm-up batch, a value is a spike when it is non-finite, or
  when it is not below the last accepted value and differs from the running mean of the last
  10 accepted values by ≥ 2 × that mean; spikes do not enter the mean (the callback raises);
- ``llm-foundry``: ``KillLossSpike``: once 100 values are held, a value ≥ 2 × their mean is an
  outlier (every value enters the window), and the 5th outlier in a row (patience 4) alarms;
  also its high-loss rule (half the window above ``loss_cap`` 10);
- ``Megatron``: ``RerunStateMachine.is_unexpectedly_large(threshold=10)``: the max of |value|
  over the first 100 values, then an alarm for a value ≥ 10 × that max (non-finite values are
  left to Megatron's separate NaN check, so they count as missed here);
- ``ZClip``: z-score of the value against an EMA mean and variance (α 0.97, 25 warm-up values),
  an alarm at z > 2.5, the EMA fed the adaptive clip value μ + 2.5²σ/z after a spike.

For the four outside rules, consecutive alarmed points are one alarm (lmtop merges the same way)
and every alarm counts as a warning (each stops or alters the run).

Events injected into copies of the clean series, one every 150-250 steps from step ~150 (as
``labelled.py`` places them), each judged on its own series:

- a loss spike of k rolling MADs: the value becomes median + k × MAD of the 100 clean values
  before it (k = 3 … 50);
- a grad-norm spike of k× the running median: k × the median of the 100 clean values before it;
- NaN and +Inf in either series (isolated points).

Detected: a finding (any severity) of that detector at the event's step or within 5 steps after;
delay = finding step − event step. False alarms: findings on the untouched series, loss and grad
norm together, per 10,000 steps of the family's runs, warning-or-critical apart from info. Cost:
µs per ``update`` of the detector alone, fed every clean series once (the loop's own overhead
included, ~0.03 µs).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import random
import statistics
import sys
import tarfile
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
from lmtop.tui.alert_settings import SpikeSettings
from lmtop.tui.detectors import CRITICAL, INFO, WARNING, TailSpikeDetector
from old_spike import OldSpikeSettings, SpikeDetector  # benchmarks/alerts is the script's path

HERE = Path(__file__).parent
METRICS = ("loss", "grad_norm")
LOSS_SIZES = (3, 5, 8, 10, 20, 50)  # rolling MADs (window 100)
GRAD_SIZES = (2, 3, 5, 10, 20, 100)  # × the running median (window 100)
TOKENS = ("NaN", "+Inf")
MATCH_STEPS = 5


@dataclass
class Trace:
    """One clean run: its family and its two series, one value per optimizer step."""

    name: str
    family: str
    loss: list[float]
    grad_norm: list[float]


def load_real(archive: Path) -> list[Trace]:
    """The traces in ``real_runs.tar.xz`` (tab-separated, a JSON line of the recipe first)."""
    out = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.name.endswith(".tsv"):
                continue
            text = io.TextIOWrapper(tar.extractfile(member), encoding="utf-8")  # type: ignore[arg-type]
            meta = json.loads(text.readline()[2:])
            text.readline()
            rows = [line.split("\t") for line in text if line.strip()]
            name = Path(member.name).stem
            out.append(
                Trace(
                    name, meta["family"], [float(r[1]) for r in rows], [float(r[2]) for r in rows]
                )
            )
    return out


def load_clean(archive: Path) -> list[Trace]:
    """The rank files in ``clean_runs.tar.xz`` (lmtop run directories)."""
    out = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.name.endswith("rank-0.jsonl"):
                continue
            loss, grad = [], []
            for line in tar.extractfile(member):  # type: ignore[union-attr]
                message = orjson.loads(line)
                if message.get("kind") == "metrics" and "loss" in message["m"]:
                    loss.append(float(message["m"]["loss"]))
                    grad.append(float(message["m"]["grad_norm"]))
            name = member.name.split("/")[-2]
            family = (
                "transformer-adamw-b16-clip (old set)" if name.startswith("lm") else "mlp (old set)"
            )
            out.append(Trace(name, family, loss, grad))
    return out


# --- the detectors, each behind one callable: value -> severity or None ---------------------


def lmtop_old() -> Callable[[float], str | None]:
    detector = SpikeDetector(OldSpikeSettings())

    def update(value: float) -> str | None:
        if not math.isfinite(value):
            return CRITICAL  # the engine's non-finite rule, ahead of any detector
        return WARNING if detector.update(value) is not None else None

    return update


def lmtop_new(metric: str = "loss") -> Callable[[float], str | None]:
    detector = TailSpikeDetector(SpikeSettings(), loss=metric == "loss")  # as the engine builds it

    def update(value: float) -> str | None:
        found = detector.update(value)
        return found.severity if found is not None else None

    return update


def _episodes(rule: Callable[[float], bool]) -> Callable[[float], str | None]:
    """Consecutive alarmed points as one alarm (a warning)."""
    previous = False

    def update(value: float) -> str | None:
        nonlocal previous
        flagged = rule(value)
        new = flagged and not previous
        previous = flagged
        return WARNING if new else None

    return update


def lightning() -> Callable[[float], str | None]:
    window: list[float] = []
    last = 0.0
    seen = 0

    def rule(value: float) -> bool:
        nonlocal last, seen
        index, seen = seen, seen + 1
        spike = False
        if index >= 1:  # warmup=1
            mean = sum(window) / len(window) if window else 0.0
            if not math.isfinite(value):
                spike = True
            elif value - last > 0:  # mode="min": a value not below the last is no improvement
                spike = abs(value - mean) >= abs(2.0 * mean)  # rtol=2, atol=None
        if not spike and math.isfinite(value):
            window.append(value)
            if len(window) > 10:
                del window[0]
            last = value
        return spike

    return _episodes(rule)


def llm_foundry() -> Callable[[float], str | None]:
    window: deque[float] = deque()
    total = 0.0  # the window's sum and its count above loss_cap, kept as values come and go
    high = 0
    outliers = 0
    step = 0

    def rule(value: float) -> bool:
        nonlocal total, high, outliers, step
        alarm = False
        if len(window) == 100:
            if value >= total / 100 * 2:
                outliers += 1
                alarm = outliers > 4
            else:
                outliers = 0
            if not alarm:  # the high-loss rule, checked whenever the spike rule did not fire
                alarm = step >= 200 and high >= 50
            old = window.popleft()
            total -= old
            high -= old > 10
        window.append(value)
        total += value
        high += value > 10
        if not math.isfinite(total):  # np.mean recovers once a NaN or Inf leaves the window
            total = sum(window)
        step += 1
        return alarm

    return _episodes(rule)


def megatron() -> Callable[[float], str | None]:
    count = 0
    largest = 0.0

    def rule(value: float) -> bool:
        nonlocal count, largest
        value = abs(value)
        if math.isnan(value) or math.isinf(value):
            return False
        if count < 100:
            count += 1
            largest = max(largest, value)
            return False
        return value >= largest * 10

    return _episodes(rule)


def zclip() -> Callable[[float], str | None]:
    buffer: list[float] = []
    mean = var = 0.0

    def rule(value: float) -> bool:
        nonlocal mean, var
        if len(buffer) < 25:
            buffer.append(value)
            if len(buffer) == 25:
                mean = sum(buffer) / 25
                var = sum((x - mean) ** 2 for x in buffer) / 25
            return False
        std = var**0.5
        z = (value - mean) / (std + 1e-6)
        spike = z > 2.5
        effective = mean + 2.5 * 2.5 * std / z if spike else value
        mean = 0.97 * mean + 0.03 * effective
        var = 0.97 * var + 0.03 * (effective - mean) ** 2
        return spike

    return _episodes(rule)


DETECTORS: dict[str, Callable[[], Callable[[float], str | None]]] = {
    "lmtop old (SpikeDetector)": lmtop_old,
    "lmtop new (TailSpikeDetector)": lmtop_new,
    "Lightning SpikeDetection": lightning,
    "llm-foundry KillLossSpike": llm_foundry,
    "Megatron 10× max seen": megatron,
    "ZClip z > 2.5": zclip,
}


# --- events --------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def inject(clean: list[float], kind: str, size: float, rng: random.Random) -> tuple[list, list]:
    """A copy of ``clean`` with events of ``kind`` ("mad", "ratio", a token), and their steps."""
    values = list(clean)
    steps = []
    position = 150 + rng.randrange(60)
    while position < len(values) - 20:
        before = clean[position - 100 : position]
        median = _median(before)
        if kind == "mad":
            values[position] = median + size * _median([abs(v - median) for v in before])
        elif kind == "ratio":
            values[position] = size * median
        else:
            values[position] = {"NaN": math.nan, "+Inf": math.inf}[kind]
        steps.append(position)
        position += 150 + rng.randrange(100)
    return values, steps


def findings(
    factory: Callable[..., Callable[[float], str | None]], values: list[float], metric: str
) -> list:
    update = factory(metric) if factory is lmtop_new else factory()
    return [(i, severity) for i, v in enumerate(values) if (severity := update(v)) is not None]


@dataclass
class Score:
    events: int = 0
    detected: int = 0
    warned: int = 0
    delays: list[int] | None = None

    def add(self, found: list[tuple[int, str]], steps: list[int]) -> None:
        if self.delays is None:
            self.delays = []
        self.events += len(steps)
        by_step = dict(found)
        for step in steps:
            for delay in range(MATCH_STEPS + 1):
                if step + delay in by_step:
                    self.detected += 1
                    self.warned += by_step[step + delay] != INFO
                    self.delays.append(delay)
                    break


def tails(traces: list[Trace]) -> None:
    """Each family's measured tail, on the clean traces."""
    families: dict[str, list[Trace]] = defaultdict(list)
    for trace in traces:
        families[trace.family].append(trace)
    print(
        "| family | runs × steps | grad norm max / median (per run) | grad norm max ÷ running "
        "median | excursions > 7.5 rolling MADs / 10k steps: grad norm · loss |"
    )
    print("|---|---|---|---|---|")
    for family, group in families.items():
        spread, ratios, excursions = [], [], {m: 0 for m in METRICS}
        steps = 0
        for trace in group:
            spread.append(max(trace.grad_norm) / _median(trace.grad_norm))
            steps += len(trace.loss)
            for metric in METRICS:
                series = getattr(trace, metric)
                for i in range(100, len(series)):
                    before = series[i - 50 : i]
                    median = _median(before)
                    mad = _median([abs(v - median) for v in before])
                    excursions[metric] += series[i] - median > 7.5 * mad
                    if metric == "grad_norm":
                        ratios.append(series[i] / _median(series[i - 100 : i]))
        print(
            f"| {family} | {len(group)} × {steps // len(group)} | {min(spread):.2f}–{max(spread):.2f} "
            f"(median {statistics.median(spread):.2f}) | max {max(ratios):.2f} |"
            f" {1e4 * excursions['grad_norm'] / steps:.1f} · {1e4 * excursions['loss'] / steps:.1f} |"
        )


def _label(metric: str, kind: str, size: float) -> str:
    if kind == "mad":
        return f"loss {size:g} MADs"
    if kind == "ratio":
        return f"grad norm {size:g}×"
    return f"{kind} in {metric.replace('_', ' ')}"


BIG_LOSS = "loss ≥ 8 MADs"
BIG_GRAD = "grad norm ≥ 10×"


def _big(label: str) -> str | None:
    """The pooled column an event size belongs to (the targets' sizes), if any."""
    words = label.split()
    if words[0] == "loss" and float(words[1]) >= 8:
        return BIG_LOSS
    if words[:2] == ["grad", "norm"] and float(words[2][:-1]) >= 10:
        return BIG_GRAD
    return None


def _recall(score: Score, warned: bool = False) -> str:
    if not score.events:
        return "–"
    return f"{(score.warned if warned else score.detected) / score.events:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tails", action="store_true", help="only each family's measured tail")
    parser.add_argument("--only", default="", help="detectors whose name contains this")
    parser.add_argument("--family", default="", help="families whose name contains this")
    parser.add_argument("--verbose", action="store_true", help="list every clean warning")
    args = parser.parse_args()
    began = time.perf_counter()
    traces = load_real(HERE / "real_runs.tar.xz") + load_clean(HERE / "clean_runs.tar.xz")
    traces = [t for t in traces if args.family in t.family]
    if args.tails:
        tails(traces)
        return
    detectors = {k: v for k, v in DETECTORS.items() if args.only in k}
    families = sorted({t.family for t in traces}, key=lambda f: (f.endswith("(old set)"), f))
    steps = {f: sum(len(t.loss) for t in traces if t.family == f) for f in families}
    # False alarms on the untouched traces: [warning or critical, info].
    alarms: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for trace in traces:
        for metric in METRICS:
            for name, factory in detectors.items():
                for step, severity in findings(factory, getattr(trace, metric), metric):
                    alarms[name, trace.family][severity == INFO] += 1
                    if args.verbose and severity != INFO:
                        print(f"  {name}: {trace.name} {metric} step {step}", file=sys.stderr)
    # Recall and delay on injected events, overall and per family.
    scores: dict[tuple[str, str], Score] = defaultdict(Score)
    by_family: dict[tuple[str, str, str], Score] = defaultdict(Score)
    rng = random.Random(0)
    cases = [("loss", "mad", k) for k in LOSS_SIZES] + [
        ("grad_norm", "ratio", k) for k in GRAD_SIZES
    ]
    cases += [(m, token, 0) for m in METRICS for token in TOKENS]
    for trace in traces:
        for metric, kind, size in cases:
            values, events = inject(getattr(trace, metric), kind, size, rng)
            label = _label(metric, kind, size)
            for name, factory in detectors.items():
                found = findings(factory, values, metric)
                for key in filter(None, (label, _big(label))):
                    scores[name, key].add(found, events)
                    by_family[name, trace.family, key].add(found, events)
    # CPU time per update of each detector alone (process time: the machine is shared).
    cost = {}
    series = [(getattr(t, m), m) for t in traces for m in METRICS]
    for name, factory in detectors.items():
        if name.startswith("lmtop old"):
            updates = [SpikeDetector(OldSpikeSettings()).update for _ in series]
        elif name.startswith("lmtop new"):
            updates = [
                TailSpikeDetector(SpikeSettings(), loss=m == "loss").update for _, m in series
            ]
        else:
            updates = [factory() for _ in series]
        count = 0
        start = time.process_time()
        for update, (values, _) in zip(updates, series):
            for value in values:
                update(value)
            count += len(values)
        cost[name] = (time.process_time() - start) / count * 1e6
    labels = [BIG_LOSS, BIG_GRAD] + [
        label
        for label in dict.fromkeys(label for _, label in scores)
        if label not in (BIG_LOSS, BIG_GRAD)
    ]
    print(
        "Recall (grad norm: as a warning in brackets); delay over the ≥ 8 MADs and ≥ 10× events.\n"
    )
    print("| detector | " + " | ".join(labels) + " | median delay | µs / update |")
    print("|---" * (len(labels) + 3) + "|")
    for name in detectors:
        cells = []
        for label in labels:
            score = scores[name, label]
            cell = _recall(score)
            if label.startswith("grad norm") and score.detected:
                cell += f" ({_recall(score, warned=True)})"
            cells.append(cell)
        delays = (scores[name, BIG_LOSS].delays or []) + (scores[name, BIG_GRAD].delays or [])
        delay = f"{statistics.median(delays):.0f}" if delays else "–"
        print(f"| {name} | " + " | ".join(cells) + f" | {delay} | {cost[name]:.2f} |")
    print(
        "\nFalse alarms per 10,000 clean steps (loss and grad norm together): warning or critical · info.\n"
    )
    print("| family | runs × steps | " + " | ".join(detectors) + " |")
    print("|---" * (len(detectors) + 2) + "|")
    total = sum(steps.values())
    for family in [*families, None]:
        group = [t for t in traces if family in (None, t.family)]
        count = total if family is None else steps[family]
        cells = []
        for name in detectors:
            pairs = [alarms[name, f] for f in families if family in (None, f)]
            warn, info = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            cells.append(f"{1e4 * warn / count:.1f} · {1e4 * info / count:.1f}")
        title = family or "**all**"
        print(f"| {title} | {len(group)} × {count // len(group)} | " + " | ".join(cells) + " |")
    shown = [n for n in detectors if n.startswith("lmtop")]
    if shown:
        print(
            "\nPer family: recall of loss spikes ≥ 8 MADs and grad-norm spikes ≥ 10× (as a warning).\n"
        )
        print("| family | " + " | ".join(f"{n}: {BIG_LOSS} · {BIG_GRAD}" for n in shown) + " |")
        print("|---" * (len(shown) + 1) + "|")
        for family in families:
            cells = []
            for name in shown:
                loss, grad = by_family[name, family, BIG_LOSS], by_family[name, family, BIG_GRAD]
                cells.append(f"{_recall(loss)} · {_recall(grad)} ({_recall(grad, warned=True)})")
            print(f"| {family} | " + " | ".join(cells) + " |")
    print(
        f"\n{len(traces)} clean traces, {total} steps; {time.perf_counter() - began:.0f} s on "
        f"{platform.machine()}, Python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
