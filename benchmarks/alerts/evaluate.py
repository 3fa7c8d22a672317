"""Measures the alert engine on the labelled set; prints the results table (Markdown).

    .venv/bin/python benchmarks/alerts/evaluate.py                 # the table
    .venv/bin/python benchmarks/alerts/make_clean_runs.py          # to train the clean runs anew

The clean runs are kept as ``clean_runs.tar.xz`` (3.8 MB; 24 run directories, 25 MB unpacked),
unpacked into a temporary folder when ``--runs`` names no folder.
    .venv/bin/python benchmarks/alerts/evaluate.py --set spike.tail_threshold=5 --types spike

An event is detected when an alert of its type (same metric, same rank) arrives at its step or
later: spikes within 5 steps, non-finite values at their own step, the rest any time after. An
alert of the type that matches no event is a false alarm; false alarms per 10,000 clean steps are
counted on the clean traces (a step is one step of one rank). Lightning's ``SpikeDetection``
(defaults: running mean of 10, rtol 2) runs on the same loss and grad-norm series when installed.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import labelled
import ranked
from labelled import Case, Event
from lmtop.hooks import schema
from lmtop.tui.alert_settings import AlertSettings, parse_override
from lmtop.tui.alerts import Alert, AlertEngine


def _matches(alert: Alert, event: Event) -> bool:
    if alert.type != event.type or alert.rank != event.rank:
        return False
    if event.metric is not None and alert.metric != event.metric:
        return False
    step = alert.step if alert.step is not None else -1
    return step >= event.step and (event.until is None or step <= event.until)


class Tally:
    """Counts for one row of the table."""

    def __init__(self) -> None:
        self.events = self.detected = self.alerts = self.true_alerts = 0
        self.delays: list[float] = []
        self.clean_alerts = 0
        self.clean_steps = 0

    def score(
        self,
        alerts: list[Alert],
        events: list[Event],
        delays_in: str = "steps",
        times: list[float] | None = None,
        event_t: float | None = None,
    ) -> None:
        self.events += len(events)
        self.alerts += len(alerts)
        used = set()
        for event in events:
            hits = [i for i, a in enumerate(alerts) if _matches(a, event)]
            if hits:
                self.detected += 1
                first = hits[0]
                if delays_in == "seconds" and times is not None and event_t is not None:
                    self.delays.append(times[first] - event_t)
                else:
                    self.delays.append((alerts[first].step or 0) - event.step)
                used.update(hits)
        self.true_alerts += len(used)

    def row(self) -> tuple[str, str, str, str]:
        recall = f"{self.detected / self.events:.3f}" if self.events else "–"
        precision = f"{self.true_alerts / self.alerts:.3f}" if self.alerts else "–"
        fa = f"{10_000 * self.clean_alerts / self.clean_steps:.2f}" if self.clean_steps else "–"
        if self.delays:
            delay = f"{statistics.median(self.delays):.0f} / {max(self.delays):.0f}"
        else:
            delay = "–"
        return recall, precision, fa, delay


def run_case(case: Case, settings: AlertSettings) -> list[Alert]:
    engine = AlertEngine(settings)
    out: list[Alert] = []
    for message in case.messages:
        out += engine.feed(case.name, message)
    return out


def lightning_alerts(case: Case, metric: str) -> list[Alert] | None:
    """Lightning's SpikeDetection on one series, its spikes as Alerts (None if not installed)."""
    try:
        import torch
        from lightning.fabric.utilities.spike import SpikeDetection
    except ImportError:
        return None
    detector = SpikeDetection()  # mode="min", window=10, warmup=1, rtol=2.0
    out = []
    index = 0
    for message in case.messages:
        if message.kind != schema.METRICS or metric not in message.m:
            continue
        value = torch.tensor(message.m[metric])
        if index >= detector.warmup and detector._is_spike(value):
            kind = "spike" if math.isfinite(message.m[metric]) else "nonfinite"
            out.append(
                Alert(kind, "warning", case.name, 0, metric, message.step, float(value), None, "")
            )
        elif bool(torch.isfinite(value)):
            detector._update_stats(value)  # what on_train_batch_end does when there is no spike
        index += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(Path(__file__).parent / "clean_runs"))
    parser.add_argument("--set", action="append", default=[], help="alert setting KEY=VALUE")
    parser.add_argument("--types", default="", help="comma-separated event types (default all)")
    parser.add_argument("--no-lightning", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", default="", help="clean traces whose name starts with this (lm, mlp)"
    )
    args = parser.parse_args()
    settings = AlertSettings()
    for text in args.set:
        settings = settings.merged(parse_override(text), "--set")
    wanted = set(filter(None, args.types.split(",")))
    began = time.perf_counter()
    runs = Path(args.runs)
    archive = Path(__file__).parent / "clean_runs.tar.xz"
    if not runs.is_dir() and archive.exists():
        runs = Path(tempfile.mkdtemp(prefix="lmtop-clean-runs-"))
        with tarfile.open(archive) as tar:
            tar.extractall(runs, filter="data")
        runs = runs / "clean_runs"
    clean = [c for c in labelled.load(runs) if c.name.startswith(args.only)]
    if not clean:
        sys.exit(f"no clean runs in {args.runs}: run make_clean_runs.py first")
    tallies: dict[str, Tally] = defaultdict(Tally)
    light: dict[str, Tally] = defaultdict(Tally)
    clean_steps = sum(c.steps for c in clean)
    # Clean traces: the false alarms of every type.
    clean_counts: dict[str, int] = defaultdict(int)
    for case in clean:
        for alert in run_case(case, settings):
            if alert.severity == "info":  # listed on screen, not an alarm
                continue
            clean_counts[alert.type] += 1
            print(f"  clean alarm: {case.name}: {alert.message}", file=sys.stderr)
    for variant, additive in (("", False), (" (additive)", True)):
        cases = labelled.build(clean, args.seed, additive=additive)
        for kind, group in cases.items():
            if kind == "clean" or (wanted and kind not in wanted) or (additive and kind != "spike"):
                continue
            for case in group:
                alerts = [a for a in run_case(case, settings) if a.type == kind]
                if kind == "spike":
                    key = (
                        f"spike {case.events[0].metric} ≥ 8×MAD{variant}"
                        if case.events[0].size >= 8
                        else None
                    )
                    size_key = f"spike {case.events[0].metric} {case.events[0].size:g}×MAD{variant}"
                    for k in filter(None, (key, size_key)):
                        tallies[k].score(
                            [a for a in alerts if a.metric == case.events[0].metric], case.events
                        )
                    if not args.no_lightning:
                        found = lightning_alerts(case, case.events[0].metric)
                        if found is not None:
                            for k in filter(None, (key, size_key)):
                                light[k].score([a for a in found if a.type == "spike"], case.events)
                else:
                    tallies[kind].score(alerts, case.events)
                    if (
                        kind == "nonfinite"
                        and not args.no_lightning
                        and case.events[0].metric == "loss"
                    ):
                        found = lightning_alerts(case, "loss")
                        if found is not None:
                            light["nonfinite (loss)"].score(
                                [a for a in found if a.type == "nonfinite"], case.events
                            )
        if additive:
            break
    # Multi-rank cases on the simulated clock.
    multi = ranked.build(clean, args.seed)
    multi_steps = sum(c.steps for c in multi["clean"])
    for case in multi["clean"]:
        for alert, _ in ranked.replay(case, AlertEngine(settings)):
            if alert.type in ("stall", "straggler"):
                clean_counts[alert.type] += 1
                print(f"  clean alarm: {case.name}: {alert.message}", file=sys.stderr)
    for kind in ("stall", "straggler"):
        if wanted and kind not in wanted:
            continue
        for case in multi[kind]:
            pairs = [
                (a, t) for a, t in ranked.replay(case, AlertEngine(settings)) if a.type == kind
            ]
            tallies[kind].score(
                [a for a, _ in pairs], case.events, "seconds", [t for _, t in pairs], case.event_t
            )
    # False alarms on clean data, per type.
    for key, tally in tallies.items():
        kind = key.split()[0]
        tally.clean_alerts = clean_counts.get(kind, 0)
        tally.clean_steps = multi_steps if kind in ("stall", "straggler") else clean_steps
    for key, tally in light.items():
        tally.clean_steps = clean_steps
        tally.clean_alerts = sum(
            len([a for a in lightning_alerts(c, m) or [] if a.type == "spike"])
            for c in clean
            for m in ((key.split()[1],) if key.startswith("spike") else ())
        )
    elapsed = time.perf_counter() - began
    print(
        "| detector | events | recall | precision | false alarms / 10k clean steps | delay (median / max) |"
    )
    print("|---|---|---|---|---|---|")

    def order(key: str) -> tuple[str, float]:
        parts = key.split()
        size = (
            parts[2].split("×")[0]
            if len(parts) > 2 and "×" in parts[2] and parts[2][0].isdigit()
            else "0"
        )
        return (
            " ".join(parts[:2]) + ("z" if "additive" in key else ""),
            float(size) if size.replace(".", "").isdigit() else 0,
        )

    for key in sorted(tallies, key=order):
        unit = "s" if key in ("stall", "straggler") else "steps"
        recall, precision, fa, delay = tallies[key].row()
        print(
            f"| lmtop {key} | {tallies[key].events} | {recall} | {precision} | {fa} | {delay} {unit} |"
        )
        if key in light:
            recall, precision, fa, delay = light[key].row()
            print(
                f"| Lightning {key} | {light[key].events} | {recall} | {precision} | {fa} | {delay} steps |"
            )
    for key in sorted(set(light) - set(tallies)):
        recall, precision, fa, delay = light[key].row()
        print(
            f"| Lightning {key} | {light[key].events} | {recall} | {precision} | {fa} | {delay} steps |"
        )
    print(
        f"\n{len(clean)} clean traces, {clean_steps} clean steps ({multi_steps} rank-steps in "
        f"{len(multi['clean'])} 4-rank runs); {elapsed:.0f} s on {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
