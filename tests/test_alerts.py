"""The alert engine's detectors on hand-built series: what must alert, and what must not."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmtop.hooks import schema
from lmtop.tui import alert_settings, rank_health
from lmtop.tui.alert_actions import Alerting, Snapshots
from lmtop.tui.alert_settings import AlertSettings, DivergenceSettings, SettingsError
from lmtop.tui.alerts import AlertEngine
from lmtop.tui.detectors import DivergenceDetector, Finding, RollingWindow, median
from lmtop.tui.learning_curve import LearningCurve
from lmtop.tui.metrics import EVAL_LOSS, GRAD_NORM, LOSS, LR, OTHER, classify
from lmtop.tui.runbook import RunBook

RUN = "r"


def message(
    step: int | None, metrics: dict[str, float], rank: int = 0, t: float | None = None
) -> schema.Message:
    data: dict[str, Any] = {
        "v": 1,
        "run": RUN,
        "rank": rank,
        "world": 1,
        "seq": 0,
        "kind": "metrics",
    }
    return schema.Message(
        RUN, rank, 1, 0, t if t is not None else float(step or 0), "metrics", step, metrics, data
    )


def start(config: dict[str, Any], rank: int = 0) -> schema.Message:
    data = {"v": 1, "kind": "start", "info": {"config": config}}
    return schema.Message(RUN, rank, 1, 0, 0.0, "start", None, {}, data)


def feed(
    series: dict[str, list[float]],
    engine: AlertEngine | None = None,
    config: dict[str, Any] | None = None,
):
    engine = engine or AlertEngine()
    alerts = engine.feed(RUN, start(config or {}))
    length = max(len(v) for v in series.values())
    for step in range(length):
        alerts += engine.feed(
            RUN, message(step, {k: v[step] for k, v in series.items() if step < len(v)})
        )
    return alerts


def noisy_loss(
    steps: int, seed: int = 0, start_: float = 4.0, end: float = 2.0, noise: float = 0.03
) -> list[float]:
    rng = random.Random(seed)
    return [end + (start_ - end) * math.exp(-i / 300) + rng.gauss(0, noise) for i in range(steps)]


def of(alerts, kind):
    return [a for a in alerts if a.type == kind]


# -- spikes -------------------------------------------------------------------------------------


def test_a_loss_spike_alerts_at_its_own_step_and_once() -> None:
    loss = noisy_loss(600)
    loss[400] += 1.0
    loss[401] += 0.8  # a spike two steps long is one spike
    spikes = of(feed({"loss": loss}), "spike")
    # 1.5x its median and absorbed: shown (info), not a warning.
    assert [(a.step, a.metric, a.severity) for a in spikes] == [(400, "loss", "info")]
    median = sorted(loss[300:400])[50]  # the median of the last 100 values
    assert spikes[0].value == loss[400] and spikes[0].baseline == pytest.approx(median, abs=0.05)
    assert "× its median" in spikes[0].message and "usual max" in spikes[0].message
    loss[400] *= 10  # 15x its median: a warning
    spikes = of(feed({"loss": loss}), "spike")
    assert [(a.step, a.severity) for a in spikes] == [(400, "warning")]


def test_a_clean_noisy_loss_and_a_fast_legitimate_drop_raise_nothing() -> None:
    # Gaussian noise crosses 6 noise scales about 0.3 times in 10,000 steps.
    alerts = [a for seed in range(5) for a in feed({"loss": noisy_loss(2000, seed)})]
    assert len(alerts) <= 1
    fast = [8.0 * math.exp(-i / 20) + 0.5 for i in range(300)]  # a loss that drops fast is fine
    assert feed({"loss": fast}) == []


def test_a_drop_is_not_a_loss_spike_but_throughput_can_be_asked_to_watch_drops() -> None:
    loss = noisy_loss(600)
    loss[300] -= 1.0
    assert of(feed({"loss": loss}), "spike") == []
    rng = random.Random(1)
    throughput = [1000 + rng.gauss(0, 10) for _ in range(300)]
    throughput[200] = 500
    settings = AlertSettings().merged({"spike": {"metrics": {"tokens_per_second": "down"}}})
    spikes = of(feed({"tokens_per_second": throughput}, AlertEngine(settings)), "spike")
    assert [(a.step, a.metric) for a in spikes] == [(200, "tokens_per_second")]
    assert "drop" in spikes[0].message


def test_no_spike_in_the_first_steps_before_a_baseline_exists() -> None:
    assert feed({"loss": [10.0, 2.0, 50.0, 3.0, 2.5, 100.0, 2.4]}) == []


def test_a_constant_series_with_zero_mad_alerts_on_a_real_jump_only() -> None:
    flat = [1.0] * 200
    assert feed({"grad_norm": flat}) == []
    tiny = [1.0] * 100 + [1.001] + [1.0] * 50  # 0.1 %: below the 1 %-of-level floor
    assert of(feed({"grad_norm": tiny}), "spike") == []
    jump = [1.0] * 100 + [3.0] + [1.0] * 50
    assert [a.step for a in of(feed({"grad_norm": jump}), "spike")] == [100]


def test_a_level_shift_is_one_alert_and_becomes_the_new_baseline() -> None:
    rng = random.Random(3)
    series = [1.0 + rng.gauss(0, 0.01) for _ in range(200)] + [
        2.0 + rng.gauss(0, 0.01) for _ in range(300)
    ]
    assert [a.step for a in of(feed({"grad_norm": series}), "spike")] == [200]


# -- non-finite ---------------------------------------------------------------------------------


def test_nan_and_inf_are_critical_at_once_in_any_metric_and_once_per_episode() -> None:
    loss = noisy_loss(50)
    loss[3] = math.nan  # even in the first steps
    other = [1.0] * 50
    other[30] = math.inf
    other[31] = math.inf
    alerts = feed({"loss": loss, "my_metric": other})
    assert [(a.type, a.metric, a.step, a.severity) for a in alerts] == [
        ("nonfinite", "loss", 3, "critical"),
        ("nonfinite", "my_metric", 30, "critical"),
    ]
    assert alerts[1].to_record()["value"] == "Infinity"  # valid JSON


def test_non_finite_values_do_not_poison_the_baselines() -> None:
    loss = noisy_loss(400)
    for step in range(100, 400, 7):
        loss[step] = math.nan
    assert of(feed({"loss": loss}), "spike") == []


# -- divergence ---------------------------------------------------------------------------------


def test_a_loss_climbing_back_up_is_divergence() -> None:
    loss = noisy_loss(1200)
    for i in range(700, 1200):
        loss[i] += (i - 700) * 0.01
    alerts = of(feed({"loss": loss}), "divergence")
    assert len(alerts) == 1 and 700 < alerts[0].step < 900 and alerts[0].severity == "critical"


def plain_divergence(loss: list[float], s: DivergenceSettings) -> tuple[int, Finding] | None:
    """The first step the rule calls divergence, computed the plain way: the rolling median of
    ``window`` losses against the lowest such median since warm-up, past both ``ratio`` × that
    best and ``noise`` × the median of the last 100 distances of a loss from the median before."""
    best = math.inf
    residuals: list[float] = []
    level = math.nan
    for step, value in enumerate(loss):
        if step:
            residuals.append(abs(value - level))
        level = median(loss[max(0, step + 1 - s.window) : step + 1])
        if step + 1 < max(s.warmup, s.window):
            continue
        best = min(best, level)
        margin = max(s.ratio * abs(best), s.noise * median(residuals[-100:]))
        if level > best + margin:
            return step, Finding(level, best, margin)
    return None


def test_divergence_is_judged_against_the_latest_best_at_its_exact_step() -> None:
    # A dip during warm-up (steps 30-70) is no best; the loss reaches its best only at step 600,
    # then climbs from 700: the margin is the latest best's, and the alert comes at the very step
    # the plain rule says.
    s = DivergenceSettings()
    rng = random.Random(1)
    loss = [3.0 - 1.5 * min(i, 600) / 600 + 0.003 * max(0, i - 700) for i in range(1100)]
    loss = [value - 1.6 * (30 <= i < 70) for i, value in enumerate(loss)]
    loss = [value + rng.gauss(0, 0.01) for value in loss]
    expected = plain_divergence(loss, s)
    assert expected is not None and 800 < expected[0] < 1100
    detector = DivergenceDetector(s)
    found = [(step, f) for step, value in enumerate(loss) if (f := detector.update(value))]
    assert found == [expected]


def test_a_warm_up_bump_and_a_noisy_plateau_are_not_divergence() -> None:
    rng = random.Random(0)
    bump = [3.0 + 0.5 * math.sin(i / 10) * (i < 60) + rng.gauss(0, 0.1) for i in range(1500)]
    assert of(feed({"loss": bump}), "divergence") == []


# -- overfitting and the diagnosis --------------------------------------------------------------


def _curves(overfit: bool, evals: int = 12) -> tuple[dict[str, list[float]], AlertEngine]:
    steps = evals * 100
    loss = noisy_loss(steps, start_=3.0, end=1.0)
    eval_loss = [math.nan] * steps  # NaN here means "no eval at this step"
    for k in range(1, evals + 1):
        step = 100 * k - 1
        eval_loss[step] = (
            1.0 + 2.0 * math.exp(-step / 300) + (0.15 * max(0, k - 6) if overfit else 0)
        )
    engine = AlertEngine()
    engine.feed(RUN, start({}))
    alerts = []
    for step in range(steps):
        metrics = {"loss": loss[step]}
        alerts += engine.feed(RUN, message(step, metrics))
        if not math.isnan(eval_loss[step]):  # evaluations arrive as their own messages
            alerts += engine.feed(RUN, message(step, {"eval_loss": eval_loss[step]}))
    return {"alerts": alerts}, engine  # type: ignore[dict-item]


def test_eval_loss_rising_over_three_evaluations_while_training_loss_falls_is_overfitting() -> None:
    result, engine = _curves(overfit=True)
    alerts = of(result["alerts"], "overfitting")
    assert [(a.step, a.metric) for a in alerts] == [(899, "eval_loss")]  # 3 rises after the 6th
    assert str(engine.diagnose(RUN)).startswith("overfitting")


def test_a_noisy_eval_loss_climbing_without_three_rises_in_a_row_is_overfitting() -> None:
    # An eval loss that jitters ±2 % between evaluations, then climbs in a zigzag (never three
    # rises in a row) to 20-30 % above its best while the training loss keeps falling.
    evals = [1.0 + (0.02 if k % 2 else -0.02) for k in range(20)]
    evals += [1.2, 1.17, 1.24, 1.21, 1.28, 1.25, 1.32]
    engine = AlertEngine()
    alerts = engine.feed(RUN, start({}))
    for k, value in enumerate(evals):
        for step in range(100 * k, 100 * k + 100):
            alerts += engine.feed(RUN, message(step, {"loss": 3.0 - step / 2000}))
        alerts += engine.feed(RUN, message(100 * k + 99, {"eval_loss": value}))
    found = of(alerts, "overfitting")
    assert [(a.step, a.severity) for a in found] == [(2299, "warning")]  # the 3rd one above
    assert "above its best 0.98" in found[0].message
    # In the first evaluations the eval noise is not known yet: 2-4 % above the best is nothing.
    engine = AlertEngine()
    early = engine.feed(RUN, start({}))
    for k, value in enumerate([1.0, 0.95, 0.99, 0.97, 0.98]):
        early += engine.feed(RUN, message(100 * k, {"loss": 3.0 - k / 20}))
        early += engine.feed(RUN, message(100 * k + 99, {"eval_loss": value}))
    assert of(early, "overfitting") == []


def test_periodic_evaluation_gaps_raise_nothing_and_the_diagnosis_follows_the_curves() -> None:
    engine = AlertEngine()
    assert str(engine.diagnose(RUN)).startswith("not enough data")
    result, engine = _curves(overfit=False, evals=2)
    assert result["alerts"] == []
    assert engine.diagnose(RUN).label == "not enough data"
    result, engine = _curves(overfit=False, evals=4)
    assert engine.diagnose(RUN).label == "underfitting"  # eval still falling fast
    result, engine = _curves(overfit=False, evals=20)
    assert engine.diagnose(RUN).label == "fitting well"
    # The verdict is told as an info record each time it changes; nothing rises above info.
    verdicts = of(result["alerts"], "learning_curve")
    assert {a.severity for a in result["alerts"]} == {"info"}
    # Each verdict told once it held for 4 evaluations: underfitting, then fitting well.
    assert [a.message.split(":")[0] for a in verdicts] == ["underfitting", "fitting well"]


_LOSSES = st.one_of(
    st.floats(0.0, 10.0),
    st.sampled_from([0.0, 1e-300, 5e-324, 1.0, 2.0, 1e300]),
)


def _rel(value: float, reference: float) -> float:
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.nan
    return (value - reference) / abs(reference)


def _verdict_as_documented(evals: list[tuple[float, float]], min_rise: float) -> str:
    """The verdict restated from the raw curves: ``evals`` is (eval loss, training loss's
    rolling median then) per evaluation; the best is the first of the lowest."""
    if len(evals) < 3:
        return "not enough data"
    best = min(range(len(evals)), key=lambda i: (evals[i][0], i))
    (last_eval, last_train), (best_eval, best_train) = evals[-1], evals[best]
    if (
        best != len(evals) - 1
        and _rel(last_eval, best_eval) >= min_rise
        and not _rel(last_train, best_train) > 0
    ):
        return "overfitting"
    if -_rel(last_eval, evals[-3][0]) > 0.02 and not _rel(last_eval, last_train) > 0.1:
        return "underfitting"
    return "fitting well"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(_LOSSES, max_size=4), _LOSSES), min_size=1, max_size=40))
def test_the_verdict_at_each_evaluation_is_the_documented_one(
    steps: list[tuple[list[float], float]],
) -> None:
    """Overfitting: the eval loss min_rise above its best while the training loss did not rise
    since; underfitting: eval loss still falling > 2 % over two evaluations, within 10 % of the
    training loss; fitting well otherwise. Whatever the curves (zeros, denormals, no training
    loss yet, ties with the best), the label the rule reads at every evaluation and the
    diagnosis shown with its reason say that."""
    s = AlertSettings().overfitting
    curve = LearningCurve(s)
    trains: list[float] = []
    evals: list[tuple[float, float]] = []
    for step, (train, eval_loss) in enumerate(steps):
        for loss in train:
            curve.train(loss)
        trains += train
        curve.evaluate(eval_loss, step)
        evals.append((eval_loss, median(trains[-25:]) if trains else math.nan))
        expected = _verdict_as_documented(evals, s.min_rise)
        assert curve.label() == expected
        diagnosis = curve.diagnose()
        assert diagnosis.label == expected and diagnosis.reason


def test_a_verdict_on_the_line_between_two_is_not_told_at_every_flip() -> None:
    # A flat eval loss evaluated every step, wandering 3 % above its best and back every 8
    # evaluations: "overfitting" and "fitting well" in turn, 50 flips. Told at each flip it
    # was 2,500 info records per rank over 20k steps of a synthetic 8-rank history; a verdict
    # told before now needs twice the hold it needed the last time.
    evals = 400
    eval_loss = [1.0 if (k // 8) % 2 == 0 else 1.03 for k in range(evals)]
    alerts = feed({"loss": [1.0] * evals, "eval_loss": eval_loss})
    verdicts = [a.message.split(":")[0] for a in of(alerts, "learning_curve")]
    assert {"overfitting", "fitting well"} <= set(verdicts), verdicts
    assert len(verdicts) <= 6, verdicts


# -- clipping, learning rate, memory ------------------------------------------------------------


def test_grad_norm_above_max_grad_norm_on_most_steps_is_clipping_saturation() -> None:
    rng = random.Random(0)
    norms = [0.5 + rng.random() * 0.3 for _ in range(200)] + [
        1.5 + rng.random() for _ in range(200)
    ]
    alerts = of(feed({"grad_norm": norms}, config={"max_grad_norm": 1.0}), "clipping")
    assert len(alerts) == 1 and 280 <= alerts[0].step <= 295
    assert of(feed({"grad_norm": norms}), "clipping") == []  # no max_grad_norm known: no verdict


def test_learning_rate_warm_up_ramp_and_decay_to_zero_are_fine_a_cut_to_zero_is_not() -> None:
    warmup = [1e-4 * i / 100 for i in range(100)]  # starts at exactly 0
    decay = [1e-4 * (1 - i / 900) for i in range(901)]  # ends at exactly 0
    assert feed({"lr": warmup + decay}) == []
    cut = warmup + [1e-4] * 200 + [0.0] * 50
    alerts = feed({"learning_rate": cut})
    assert [(a.type, a.step) for a in alerts] == [("learning_rate", 300)]
    never = [0.0] * 300
    assert [a.step for a in feed({"lr": never}, config={"warmup_steps": 50})] == [150]
    # Cut halfway down its decay: judged against the rate just before (over 5 % of the peak),
    # which the alert names
    half = warmup + decay[:450] + [0.0] * 10
    alerts = feed({"learning_rate": half})
    assert [(a.step, a.message) for a in alerts] == [
        (550, "learning_rate is 0 at step 550: cut from 5.01e-5")
    ]


def test_memory_above_95_percent_of_a_known_total_alerts_once() -> None:
    used = [60.0] * 50 + [96.0] * 20 + [80.0] * 10 + [97.0] * 5
    alerts = feed({"memory_allocated": used, "memory_total": [100.0] * 85})
    assert [(a.type, a.step) for a in alerts] == [("memory", 50), ("memory", 80)]
    assert feed({"memory_allocated": used}) == []  # total unknown
    assert feed({"gpu_mem_percent": [50.0, 99.0, 99.0]})[0].step == 1


def test_memory_total_from_the_config_follows_a_new_start() -> None:
    """The total a run's config names is used, and a resumed run's start with another total
    (another device) replaces it from its next step on."""
    engine = AlertEngine()
    alerts = feed({"memory_allocated": [60.0] * 20}, engine, config={"memory_total": 100.0})
    assert alerts == []
    alerts = engine.feed(RUN, start({"memory_total": 62.0}))
    alerts += engine.feed(RUN, message(20, {"memory_allocated": 60.0}))
    assert [(a.type, a.step, round(a.value, 3)) for a in alerts] == [("memory", 20, 0.968)]


# -- time: stalls and stragglers ----------------------------------------------------------------


def _drive(world: int, seconds_per_step, steps: int, until: float):
    """Ranks publishing on a simulated clock; ``seconds_per_step(rank, step)`` (None: silent)."""
    engine, book = AlertEngine(), RunBook()
    run = book.run(RUN, RUN, None)
    events = []
    for rank in range(world):
        t = 0.0
        for step in range(steps):
            pace = seconds_per_step(rank, step)
            if pace is None:
                break
            t += pace
            events.append((t, rank, step))
    events.sort()
    alerts, now, index = [], 0.0, 0
    while now < until:
        now += 1.0
        while index < len(events) and events[index][0] <= now:
            t, rank, step = events[index]
            state = book.rank(run, rank)
            published = message(step, {"loss": 2.0}, rank=rank, t=t)
            published.seq = state.applied + 1
            book.apply(run, state, published)
            state.last_seen = t  # the simulated clock, not the machine's
            alerts += engine.feed(RUN, published)
            index += 1
        alerts += engine.tick(book.health(now))
    return alerts


def test_a_rank_silent_while_others_progress_is_stalled_once() -> None:
    alerts = _drive(4, lambda r, s: None if (r == 2 and s >= 100) else 0.5, 1000, 400)
    stalls = of(alerts, "stall")
    assert [(a.rank, a.step, a.severity) for a in stalls] == [(2, 99, "critical")]
    assert 30 <= stalls[0].value <= 32


def test_steady_ranks_raise_nothing_and_a_slow_rank_is_a_straggler() -> None:
    assert _drive(4, lambda r, s: 0.5 + 0.01 * r, 600, 290) == []
    alerts = _drive(4, lambda r, s: 1.0 if (r == 1 and s >= 100) else 0.5, 1000, 300)
    assert [(a.type, a.rank) for a in alerts] == [("straggler", 1)]
    assert 100 <= (alerts[0].step or 0) <= 115


def test_ranks_in_lockstep_with_uneven_steps_are_not_stragglers() -> None:
    # Data-parallel ranks step together, but some steps are slow (a data-loader stall, a
    # logging step), so a rank's median step time sits between two modes. A rank that
    # publishes 20-60 ms after the others is one interval behind them at times: measured over
    # different steps, one extra interval flips its median, which is not a slower rank.
    rng = random.Random(3)
    paces = [0.45 if rng.random() < 0.5 else 0.04 for _ in range(1200)]
    alerts = _drive(4, lambda r, s: paces[s] + (0.02 * r if s == 0 else 0.0), 1200, 300)
    assert of(alerts, "straggler") == []


def test_a_run_of_one_rank_has_no_stall_or_straggler() -> None:
    assert _drive(1, lambda r, s: None if s >= 50 else 0.5, 100, 200) == []


# -- names and settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("loss", LOSS),
        ("train/loss", LOSS),
        ("train_loss", LOSS),
        ("eval_loss", EVAL_LOSS),
        ("eval/loss", EVAL_LOSS),
        ("val_loss", EVAL_LOSS),
        ("grad_norm", GRAD_NORM),
        ("train/grad_norm", GRAD_NORM),
        ("lr", LR),
        ("learning_rate", LR),
        ("lr-AdamW", OTHER),
        ("loss_scale", OTHER),
        ("epoch", OTHER),
    ],
)
def test_metric_names_are_recognised(name: str, kind: int) -> None:
    assert classify(name) == kind


def test_settings_from_toml_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "lmtop.toml").write_text(
        '[alerts.spike]\ntail_threshold = 9\nmetrics = { step_time = "up" }\n'
    )
    settings = alert_settings.load([str(runs)], overrides=["stall.min_seconds=60"])
    assert settings.spike.tail_threshold == 9.0 and settings.spike.metrics == {"step_time": "up"}
    assert settings.stall.min_seconds == 60.0
    overridden = alert_settings.load([str(runs)], overrides=["spike.tail_threshold=7"])
    assert overridden.spike.tail_threshold == 7.0
    with pytest.raises(SettingsError, match=r"spike\.treshold"):
        alert_settings.load([], overrides=["spike.treshold=3"])
    with pytest.raises(SettingsError, match="expected a number"):
        alert_settings.load([], overrides=["spike.tail_threshold=lots"])
    # The first detector's settings, gone with it: a file that still sets one is read, with a
    # note naming what replaced it, never refused.
    capsys.readouterr()
    old = alert_settings.load([], overrides=["spike.threshold=8", "spike.tail_window=90"])
    assert old.spike.tail_window == 90 and not hasattr(old.spike, "threshold")
    assert "spike.threshold is ignored" in capsys.readouterr().err
    (runs / "lmtop.toml").write_text("[alerts\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        alert_settings.load([str(runs)])
    assert AlertEngine(AlertSettings(enabled=False)).feed(RUN, message(1, {"loss": math.nan})) == []


def test_rolling_window_median_matches_a_sort() -> None:
    rng = random.Random(0)
    window, values = RollingWindow(7), []
    for _ in range(100):
        value = rng.random()
        window.add(value)
        values = ([*values, value])[-7:]
        ordered = sorted(values)
        n = len(ordered)
        expected = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        assert window.median() == expected


def test_rolling_window_mad_matches_a_sort_with_ties_and_both_sizes() -> None:
    rng = random.Random(1)
    for size in (1, 2, 7, 50):
        window, values = RollingWindow(size), []
        for _ in range(300):
            value = float(rng.choice([1, 2, 2, 3])) if rng.random() < 0.3 else rng.gauss(0, 1)
            window.add(value)
            values = ([*values, value])[-size:]
            centre = window.median()
            distances = sorted(abs(v - centre) for v in values)
            n = len(distances)
            mad = distances[n // 2] if n % 2 else (distances[n // 2 - 1] + distances[n // 2]) / 2
            assert window.mad(centre) == pytest.approx(mad, abs=1e-12)


def test_a_spike_of_8_rolling_mads_is_caught_at_its_step() -> None:
    # The labelled set's definition: k MADs of the last 100 values above their median.
    rng = random.Random(5)
    base = [1.0 + rng.gauss(0, 0.02) for _ in range(400)]
    window = sorted(base[200:300])
    median = (window[49] + window[50]) / 2
    mad_window = RollingWindow(100)
    for value in base[200:300]:
        mad_window.add(value)
    series = list(base)
    series[300] = median + 8.0 * mad_window.mad(median)
    found = of(feed({"loss": series}), "spike")
    assert [a.step for a in found] == [300]
    assert of(feed({"loss": base}), "spike") == []  # and nothing without it


# -- one event, one alert; severity -------------------------------------------------------------


def _ranked(step: int, metrics: dict[str, float], rank: int) -> schema.Message:
    published = message(step, metrics, rank=rank)
    published.seq = step
    return published


def test_a_spike_every_rank_sees_is_one_alert_naming_the_ranks() -> None:
    # An all-reduced grad norm is the same on every rank: its spike is one event.
    rng = random.Random(2)
    norms = [math.exp(rng.gauss(0, 0.1)) for _ in range(400)]
    norms[300] = 50.0
    engine = AlertEngine()
    told = []
    for step in range(400):
        batch = [(RUN, _ranked(step, {"grad_norm": norms[step]}, rank)) for rank in range(4)]
        if step == 300:  # ranks 2 and 3 arrive in the next poll: still the same event
            told += engine.feed_batch(batch[:2])
            told += engine.feed_batch(batch[2:])
        else:
            told += engine.feed_batch(batch)
    spikes = [(i, a) for i, a in told if a.type == "spike"]
    assert [(a.step, a.ranks, a.severity) for _, a in spikes] == [(300, (0, 1), "warning")]
    assert spikes[0][0] == 1 and spikes[0][1].message.endswith("(ranks 0-1)")


def test_a_loss_spike_right_after_a_grad_norm_spike_is_a_warning() -> None:
    loss = noisy_loss(600)
    rng = random.Random(4)
    norms = [math.exp(rng.gauss(0, 0.1)) for _ in range(600)]
    norms[400] = 3.0  # 3x: a small excursion alone, info at most
    loss[402] += 1.0  # 1.5x: alone, info at most; two steps after the grad norm: one story
    alerts = of(feed({"loss": loss, "grad_norm": norms}), "spike")
    by_metric = {a.metric: a for a in alerts}
    assert by_metric["grad_norm"].severity == "info"
    assert by_metric["loss"].severity == "warning" and by_metric["loss"].step == 402
    assert "follows a grad norm spike at step 400" in by_metric["loss"].message
    loss_alone = of(feed({"loss": loss}), "spike")
    assert [(a.step, a.severity) for a in loss_alone] == [(402, "info")]


_ODD_VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 5e-324, 1e-300, 1e300, 1.7e308, -1.7e308]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(0.0, 10.0),
)


@given(
    st.lists(st.tuples(_ODD_VALUES, st.integers(0, 2)), min_size=1, max_size=60),
    st.integers(0, 400),
)
@settings(max_examples=200, deadline=None)
def test_no_series_of_values_makes_the_engine_raise(
    pattern: list[tuple[float, int]], constant_steps: int
) -> None:
    """Whatever a run reports (a grad norm of exactly 0 for steps on end, denormals, ±1.7e308,
    NaN, negative losses), the engine judges it and never raises: a raise stopped the viewer's
    poll thread, and so the screen, for good (a run of zero grad norms did, in every rule)."""
    engine = AlertEngine(AlertSettings().merged({"spike": {"metrics": {"tokens": "down"}}}))
    names = ("loss", "grad_norm", "learning_rate", "eval_loss", "tokens", "accuracy")
    seq = 0
    values = [0.0] * constant_steps + [value for value, _ in pattern] * 6
    for step, value in enumerate(values):
        for rank in range(2):
            message = schema.Message(
                "r", rank, 2, seq, 1.0 + step, "metrics", step, dict.fromkeys(names, value), {}
            )
            engine.feed_batch([("k", message)])
            seq += 1


def test_an_error_in_the_engine_stops_alerts_not_the_viewer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of lmtop's own alert code (it was a run of zero grad norms) is told once as a
    warning naming the error; every message is still printed (in the app: still drawn)."""
    import io

    from lmtop.tui import headless
    from runs import write_run

    run_dir = write_run(tmp_path, "faulty", ranks=2, steps=50)
    calls = {"n": 0}
    feed = AlertEngine.feed_batch

    def failing(self: AlertEngine, batch: Any, known: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ZeroDivisionError("float division by zero")
        return feed(self, batch, known)

    monkeypatch.setattr(AlertEngine, "feed_batch", failing)
    out = io.BytesIO()
    status = headless.run([str(run_dir)], follow=False, out=out)
    records = [orjson.loads(line) for line in out.getvalue().splitlines()]
    internal = [r for r in records if r.get("kind") == "alert" and r["type"] == "internal"]
    assert status == 0 and len(internal) == 1
    assert "ZeroDivisionError" in internal[0]["message"] and internal[0]["severity"] == "warning"
    written = sum(f.read_bytes().count(b'"kind":"metrics"') for f in run_dir.glob("*.jsonl"))
    assert sum(1 for r in records if r.get("kind") == "metrics") == written > 100
    # It belongs to no run (the app lists it under every run), and crashes are still told.
    assert internal[0]["run"] == "lmtop" and internal[0]["dir"] is None
    alerting = Alerting(AlertSettings(), {})
    calls["n"] = 0  # its first batch fails too
    message = schema.Message("r", 0, 1, 0, 1.0, "metrics", 0, {"loss": 1.0}, {})
    assert [a.type for _, a in alerting.feed_batch([("k", message)])] == ["internal"]
    assert alerting.feed_batch([("k", message)]) == []
    crash = rank_health.Crash("k", 0, 7)
    assert [a.type for a in alerting.tick([crash])] == ["crashed"]
    # A failure judging crashes says its own error, not the metrics' one.
    monkeypatch.setattr(AlertEngine, "tick", lambda self, episodes: 1 / 0)
    (told,) = alerting.tick([crash])
    assert "crash" in told.message and "division by zero" in told.message
    assert "float division" not in told.message


_OBSERVED = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),  # run key
        st.integers(0, 2),  # rank
        st.sampled_from(["metrics", "metrics", "metrics", "end", "event", "no-step"]),
        st.integers(1, 4),  # world
    ),
    max_size=700,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_OBSERVED, max_size=4))
def test_snapshots_see_a_batch_whole_as_they_see_its_messages_one_by_one(
    batches: list[list[tuple[str, int, str, int]]],
) -> None:
    """A batch that raised no alert is taken whole (each rank's last messages kept): every rank
    keeps the same last messages, run worlds and ended ranks as when each message is observed."""
    one_by_one, whole = Snapshots(), Snapshots()
    seq = 0
    long = [("a", 0, "metrics", 2)] * 450 + [("a", 1, "metrics", 2)] * 150  # past the ring
    for batch in [long, *batches]:
        messages = []
        for key, rank, kind, world in batch:
            seq += 1
            step = None if kind == "no-step" else seq
            kind = "metrics" if kind == "no-step" else kind
            data = {"m": {"loss": 1.0}} if kind == "metrics" else {}
            messages.append(
                (key, schema.Message(key, rank, world, seq, 0.0, kind, step, {"loss": 1.0}, data))
            )
        for key, message in messages:
            one_by_one.observe(key, message)
        whole.observe_batch(messages)
        for snapshots in (one_by_one, whole):
            assert not snapshots._pending

    def state(s: Snapshots) -> Any:
        recent = {rank: [m.seq for m in ring] for rank, ring in s._recent.items() if ring}
        return recent, s._world, s._ended

    assert state(whole) == state(one_by_one)
