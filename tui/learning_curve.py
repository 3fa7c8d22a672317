"""Training loss against eval loss: the overfitting alert and the run's learning-curve diagnosis.

Evaluations are sparse (every few hundred steps) and the training loss is noisy, so each
evaluation is paired with the training loss's rolling median at that moment. Overfitting is the
eval loss rising over K consecutive evaluations, to at least ``min_rise`` above its best, while
the training loss did not rise over the same evaluations.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from .alert_settings import OverfittingSettings
from .detectors import Finding, median

MAX_EVALS = 64  # recent evaluations kept; the best one is kept apart
TRAIN_WINDOW = 25


class Evaluation(NamedTuple):
    """One eval loss with the training loss's level when it arrived (a tuple: made at every
    evaluation, which some runs log every step, and a frozen dataclass costs 3× to make)."""

    step: int
    eval_loss: float
    train_loss: float  # NaN before any training loss


@dataclass(slots=True, frozen=True)
class Diagnosis:
    """The learning-curve verdict: ``label`` is one of :data:`LABELS`, ``reason`` says why."""

    label: str
    reason: str

    def __str__(self) -> str:
        return f"{self.label}: {self.reason}"


NOT_ENOUGH_DATA, UNDERFITTING, OVERFITTING, FITTING_WELL = (
    "not enough data",
    "underfitting",
    "overfitting",
    "fitting well",
)
LABELS = (NOT_ENOUGH_DATA, UNDERFITTING, OVERFITTING, FITTING_WELL)
MIN_EVALS = 3


class LearningCurve:
    """One rank's training and eval losses, reduced to what the verdicts need."""

    __slots__ = ("_alerted", "_train", "best", "evals", "first", "s")

    def __init__(self, settings: OverfittingSettings) -> None:
        self.s = settings
        self._train: deque[float] = deque(maxlen=TRAIN_WINDOW)  # sorted only when asked
        self.evals: deque[Evaluation] = deque(maxlen=MAX_EVALS)
        self.best: Evaluation | None = None
        self.first: Evaluation | None = None
        self._alerted = False

    @property
    def train_level(self) -> float:
        """The training loss's rolling median (NaN before any)."""
        return median(self._train)

    def train(self, loss: float, step: int = 0) -> None:
        """Takes a finite training loss (``step`` unused: the engine's detector signature).

        Every step's loss comes here and the median is wanted only at an evaluation, so the
        window is a plain deque, sorted then."""
        self._train.append(loss)

    def noise(self) -> float:
        """How much the eval loss jitters between evaluations around its smooth course: half
        the median absolute second difference of the evaluations before the last K (0 while
        there are too few). A smooth curve, falling or rising, has almost none; a healthy run's
        eval loss wandering 1-2 % has some, and the overfitting alert must rise above it."""
        values = [e.eval_loss for e in list(self.evals)[-(17 + self.s.evaluations) :]]
        values = values[: -self.s.evaluations]
        bends = sorted(abs(c - 2 * b + a) for a, b, c in zip(values, values[1:], values[2:]))
        return bends[len(bends) // 2] / 2 if bends else 0.0

    def evaluate(self, eval_loss: float, step: int) -> Finding | None:
        """Takes a finite eval loss; returns a Finding when overfitting starts here."""
        point = Evaluation(step, eval_loss, self.train_level)
        self.evals.append(point)
        if self.first is None:
            self.first = point
        if self.best is None or eval_loss < self.best.eval_loss:
            self.best = point
            self._alerted = False
            return None
        k = self.s.evaluations
        if self._alerted or len(self.evals) <= k:
            return None
        recent = list(self.evals)[-(k + 1) :]
        rising = all(b.eval_loss > a.eval_loss for a, b in itertools.pairwise(recent))
        best, noise = self.best.eval_loss, self.noise()
        least = self.s.min_rise * abs(best)
        floor = best + max(least, self.s.noise * noise)
        # A rise that eval noise keeps from being monotonic: K evaluations in a row far above
        # the best (a noisy near-zero eval loss climbing 10 % per evaluation rarely rises three
        # times in a row, yet soon lies above anything its noise explains).
        high = best + max(least, self.s.sustained * noise)
        sustained = noise > 0 and all(e.eval_loss >= high for e in recent[1:])  # noise known
        train_then, train_now = recent[0].train_loss, recent[-1].train_loss
        train_not_rising = not (train_now > train_then)  # NaN (no training loss) counts as falling
        if (sustained or (rising and eval_loss >= floor)) and train_not_rising:
            self._alerted = True
            return Finding(eval_loss, self.best.eval_loss)
        return None

    def diagnose(self) -> Diagnosis:
        """Underfitting, overfitting, fitting well, or not enough data, with the reason."""
        label = self.label()
        return Diagnosis(label, self._reason(label))

    def label(self) -> str:
        """The verdict's label alone. Asked at every evaluation (the learning-curve rule), so it
        computes no more than the label needs; :meth:`_reason` says why, when it is told. The
        comparisons are :func:`_relative`'s, written out: a call costs more than they do."""
        evals = self.evals
        best = self.best
        if len(evals) < MIN_EVALS or best is None or self.first is None:
            return NOT_ENOUGH_DATA
        last = evals[-1]
        eval_loss, train_loss = last.eval_loss, last.train_loss
        if best is not last:
            best_eval, best_train = best.eval_loss, best.train_loss
            # _relative(eval, best eval) >= min_rise: both finite, the best not 0.
            if (
                best_eval != 0
                and eval_loss - eval_loss == 0.0
                and best_eval - best_eval == 0.0
                and (eval_loss - best_eval) / abs(best_eval) >= self.s.min_rise
                # not _relative(train, best train) > 0: the training loss did not rise.
                and not (
                    best_train != 0
                    and train_loss - train_loss == 0.0
                    and best_train - best_train == 0.0
                    and train_loss > best_train
                )
            ):
                return OVERFITTING
        before = evals[-MIN_EVALS].eval_loss
        # -_relative(eval, eval MIN_EVALS - 1 evaluations ago) > 0.02, and not
        # _relative(eval, train) > 0.1 (the eval loss not far above the training loss).
        if (
            before != 0
            and eval_loss - eval_loss == 0.0
            and before - before == 0.0
            and (before - eval_loss) / abs(before) > 0.02
            and not (
                train_loss != 0
                and train_loss - train_loss == 0.0
                and (eval_loss - train_loss) / abs(train_loss) > 0.1
            )
        ):
            return UNDERFITTING
        return FITTING_WELL

    def _reason(self, label: str) -> str:
        """Why the curves earn ``label`` (the one :meth:`label` gave)."""
        if label == NOT_ENOUGH_DATA:
            count = len(self.evals)
            return f"{count} evaluation{'s' * (count != 1)} so far, {MIN_EVALS} needed"
        last, best = self.evals[-1], self.best
        assert best is not None
        rise = _relative(last.eval_loss, best.eval_loss)
        if label == OVERFITTING:
            train_change = _relative(last.train_loss, best.train_loss)
            fell = (
                "" if math.isnan(train_change) else f" while training loss fell {-train_change:.0%}"
            )
            return f"eval loss {rise:.0%} above its best (step {best.step}){fell}"
        if label == UNDERFITTING:
            eval_drop = -_relative(last.eval_loss, self.evals[-MIN_EVALS].eval_loss)
            return (
                f"eval loss still falling ({eval_drop:.0%} over the last {MIN_EVALS - 1} "
                "evaluations) with training loss close to it: train longer or add capacity"
            )
        gap = _relative(last.eval_loss, last.train_loss)
        gap_text = "" if math.isnan(gap) else f", eval {gap:+.0%} against training loss"
        return f"eval loss {last.eval_loss:.4g} within {max(rise, 0.0):.1%} of its best{gap_text}"


def _relative(value: float, reference: float) -> float:
    """(value - reference) / |reference|, NaN when undefined."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.nan
    return (value - reference) / abs(reference)
