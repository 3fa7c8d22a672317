"""``lmtop --summary RUN...``: what each run of a sweep came to, one line per run.

Final and best training loss, final and best eval loss (with their steps), the last step, the
run's duration, its state and its alerts, read through the same follower, store and alert
engine as the screen. A table for people; with ``--headless``, one JSON object per run.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TextIO

import orjson
from lmtop.hooks import schema

from . import metrics, numbers
from .alert_actions import Alerting
from .alert_settings import AlertSettings
from .follow import Follower
from .store import Store
from .text import inert


@dataclass(slots=True)
class RunSummary:
    """One run's outcome."""

    run: str
    dir: str | None
    state: str
    ranks: int
    last_step: int | None
    seconds: float | None
    loss: float | None  # the last training loss (rank 0's, or the lowest rank's)
    best_loss: float | None
    eval_loss: float | None
    best_eval_loss: float | None
    best_eval_step: int | None
    alerts: int
    critical: int


def summarise(paths: Sequence[str], settings: AlertSettings | None = None) -> list[RunSummary]:
    """Reads the runs under ``paths`` to their end (no following) and sums each one up."""
    settings = settings if settings is not None else AlertSettings()
    follower = Follower(paths, follow=False, live=False)
    alerting = Alerting(settings, follower.runs)
    store = Store()
    alerts: dict[str, list[str]] = {}
    try:
        while True:
            batch = follower.poll(0)
            store.add(batch)
            # A batch at once, as headless mode and the screen take it: one event seen by
            # several ranks is one alert with the gravest severity any of them gave it.
            for _, alert in alerting.feed_batch(batch):
                alerts.setdefault(alert.key, []).append(alert.severity)
            if follower.done:
                break
    finally:
        follower.close()
        alerting.close()
    out = []
    for run in sorted(follower.book.snapshot(), key=lambda r: (r.started or 0.0, r.name)):
        loss = _series(store, run.key, metrics.LOSS_NAMES)
        evals = _series(store, run.key, metrics.EVAL_LOSS_NAMES)
        best_eval = min(evals, key=lambda p: p[1], default=None)
        severities = alerts.get(run.key, [])
        out.append(
            RunSummary(
                run=run.name,
                dir=None if run.dir is None else str(run.dir),
                state=run.state,
                ranks=len(run.ranks),
                last_step=run.last_step,
                seconds=run.last_t - run.started if run.started and run.last_t else None,
                loss=loss[-1][1] if loss else None,
                best_loss=min((v for _, v in loss), default=None),
                eval_loss=evals[-1][1] if evals else None,
                best_eval_loss=None if best_eval is None else best_eval[1],
                best_eval_step=None if best_eval is None else best_eval[0],
                alerts=len(severities),
                critical=severities.count("critical"),
            )
        )
    return out


def _series(store: Store, key: str, names: tuple[str, ...]) -> list[tuple[int, float]]:
    """(step, value) of the first of ``names`` the run publishes, from its lowest rank that has
    it; NaN and Inf left out (an alert tells of them)."""
    name = metrics.first_present(names, store.metrics.get(key, set()))
    ranks = store.ranks(key, name) if name is not None else []
    series = store.get(key, ranks[0], name) if ranks and name is not None else None
    if series is None:
        return []
    return [(s, v) for s, v in zip(series.steps, series.values) if math.isfinite(v)]


COLUMNS = (
    ("run", "run"),
    ("state", "state"),
    ("ranks", "ranks"),
    ("step", "last_step"),
    ("time", "seconds"),
    ("loss", "loss"),
    ("best", "best_loss"),
    ("eval", "eval_loss"),
    ("best eval", "best_eval_loss"),
    ("at step", "best_eval_step"),
    ("alerts", "alerts"),
)


def table(rows: list[RunSummary]) -> str:
    """The summaries as an aligned text table, numbers as the screen writes them."""
    cells = [[title for title, _ in COLUMNS]]
    for row in rows:
        values = asdict(row)
        line = []
        for _, field in COLUMNS:
            value = values[field]
            if value is None:
                line.append("-")
            elif field == "run":
                line.append(inert(value, 60))
            elif field == "seconds":
                line.append(numbers.duration(value))
            elif field in ("last_step", "best_eval_step"):
                line.append(numbers.step(value))
            elif field == "alerts":
                line.append(f"{value} ({row.critical} critical)" if row.critical else str(value))
            elif isinstance(value, float):
                line.append(numbers.number(value, 4))
            else:
                line.append(str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def run(
    paths: Sequence[str],
    as_json: bool = False,
    settings: AlertSettings | None = None,
    out: TextIO | None = None,
) -> int:
    """Prints the summaries; exit status 2 when a critical alert fired, 1 when no run was found."""
    stream = out if out is not None else sys.stdout
    rows = summarise(paths, settings)
    if not rows:
        print(
            "lmtop: no runs found in " + (", ".join(paths) or "this user's live runs"),
            file=sys.stderr,
        )
        return 1
    if as_json:
        for row in rows:
            record = {
                k: schema.finite_or_token(v) if isinstance(v, float) else v
                for k, v in asdict(row).items()
            }
            stream.write(orjson.dumps({"kind": "summary", **record}).decode() + "\n")
    else:
        stream.write(table(rows) + "\n")
    return 2 if any(row.critical for row in rows) else 0
