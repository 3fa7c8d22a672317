"""Runs nobody instrumented: a Hugging Face ``Trainer``'s output (or checkpoint) directory.

Every ``Trainer`` writes ``trainer_state.json`` into each ``checkpoint-<step>/`` it saves (and
into the output directory on ``save_state()``). Its ``log_history`` is the run: each logged
training step (``loss``, ``grad_norm``, ``learning_rate``, ``epoch``), each evaluation
(``eval_*``), and at the end a summary (``train_runtime``, ``train_loss``). This module turns
that file into protocol messages, built and checked by :mod:`lmtop.hooks.schema` exactly as a
hooked run's are, so the run book, the store, the alerts, the charts and the headless output
treat the run like any other. The newest file is re-read when it changes: a run still training
is followed checkpoint by checkpoint.

What the file does not say is synthesised, and only that: one rank (rank 0 of a world of 1; the
file is the main process's view); times, which the file does not record, are placed between
the checkpoints' file times (and the start, ``train_runtime`` before the end, when known);
the run ends ``ok`` with its summary entry. Each checkpoint, and each new best checkpoint, is
an event.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtop.hooks import schema

from . import synthetic

STATE_FILE = "trainer_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# log_history keys that are not metrics: where the entry is, not what was measured.
NOT_METRICS = frozenset({"step"})
SUMMARY_KEY = "train_runtime"  # the end-of-training entry


def checkpoints(path: Path) -> dict[int, Path]:
    """The ``checkpoint-<step>`` directories of an output directory, by step."""
    found = {}
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                match = CHECKPOINT.match(entry.name)
                if match and entry.is_dir():
                    found[int(match.group(1))] = Path(entry.path)
    except OSError:
        pass
    return found


def state_files(path: Path) -> list[Path]:
    """Every ``trainer_state.json`` of an output or checkpoint directory: its own, then each
    checkpoint's, by step."""
    files = [path / STATE_FILE] + [d / STATE_FILE for _, d in sorted(checkpoints(path).items())]
    return [f for f in files if f.is_file()]


def is_trainer_dir(path: Path) -> bool:
    """Whether ``path`` is a Trainer's output or checkpoint directory (it has a state file)."""
    return path.is_dir() and bool(state_files(path))


def trainer_dirs(folder: Path) -> list[Path]:
    """The Trainer runs a path holds: itself (an output or checkpoint directory), or the output
    directories directly inside it (a folder of runs)."""
    if is_trainer_dir(folder):
        return [Path(os.path.realpath(folder))]
    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir() and is_trainer_dir(Path(entry.path)):
                    found.append(Path(os.path.realpath(entry.path)))
    except OSError:
        pass
    return sorted(found)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@dataclass(slots=True)
class TrainerRun:
    """One output directory, followed: what of its newest state file has become messages."""

    dir: Path
    name: str = ""
    seq: int = 0  # the next message's seq (rank 0 counts from 0, as a hooked rank does)
    entries: int = 0  # log_history entries turned into messages
    checkpoints: set[int] = field(default_factory=set)
    best: str | None = None
    ended: bool = False  # the summary entry was read
    end_sent: bool = False
    seen: tuple[Any, ...] = ()  # what the directory looked like at the last read
    bad: int = 0  # state files that could not be read (a write in progress is read again)

    def __post_init__(self) -> None:
        if not self.name:
            # A checkpoint directory opened on its own is named for its run (the parent).
            self.name = self.dir.parent.name if CHECKPOINT.match(self.dir.name) else self.dir.name

    def read(self) -> list[schema.Message]:
        """The messages the directory holds beyond those already returned."""
        files = state_files(self.dir)
        marks = tuple((str(f), _mtime(f)) for f in files)
        if not files or marks == self.seen:
            return []
        newest = max(files, key=lambda f: (_mtime(f), _state_step(f)))
        try:
            state = json.loads(newest.read_text())
            history = state["log_history"]
            if not isinstance(history, list):
                raise TypeError("log_history is not a list")
        except (OSError, ValueError, KeyError, TypeError):
            self.bad += 1
            return []  # half-written: read again on the next change
        self.seen = marks
        clock = _Clock(self.dir, files, history)
        out: list[schema.Message] = []
        if self.seq == 0:
            out.append(self._message("start", None, clock.start, info=_info(newest, state)))
        for entry in history[self.entries :]:
            if not isinstance(entry, dict):
                continue
            step = entry.get("step")
            step = step if isinstance(step, int) and not isinstance(step, bool) else None
            t = clock.at(step)
            if SUMMARY_KEY in entry:
                summary = _numbers(entry)
                out.append(self._message("event", step, t, text="training ended", data=summary))
                self.ended = True
                continue
            m = {k: v for k, v in _numbers(entry).items() if k not in NOT_METRICS}
            if m:
                out.append(self._message("metrics", step, t, m=m))
        self.entries = len(history)
        for step, path in sorted(checkpoints(self.dir).items()):
            if step not in self.checkpoints:
                self.checkpoints.add(step)
                out.append(
                    self._message(
                        "event", step, clock.at(step), text=f"checkpoint saved: {path.name}"
                    )
                )
        best = state.get("best_model_checkpoint")
        if isinstance(best, str) and best != self.best:
            self.best = best
            metric = state.get("best_metric")
            text = f"best checkpoint: {Path(best).name}"
            if isinstance(metric, (int, float)):
                text += f" (best metric {metric:.6g})"
            step = _step_of(best)
            out.append(self._message("event", step, clock.at(step), text=text))
        if self.ended and not self.end_sent:
            self.end_sent = True
            step = state.get("global_step")
            step = step if isinstance(step, int) and not isinstance(step, bool) else None
            out.append(self._message("end", step, clock.end, status="ok"))
        return out

    def _message(self, kind: str, step: int | None, t: float, **fields: Any) -> schema.Message:
        self.seq += 1
        return synthetic.message(self.name or "trainer", self.seq - 1, kind, step, t, **fields)


def _numbers(entry: dict[str, Any]) -> dict[str, float]:
    return {
        str(k): float(v)
        for k, v in entry.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _state_step(path: Path) -> int:
    return _step_of(str(path.parent)) or 0


def _step_of(path: str) -> int | None:
    match = CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def _info(source: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The start message's info: what the state file says about the run's plan."""
    keys = (
        "max_steps",
        "num_train_epochs",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "train_batch_size",
        "best_metric",
    )
    config = {k: state[k] for k in keys if isinstance(state.get(k), (int, float, str))}
    if isinstance(config.get("max_steps"), int):
        config["total_steps"] = config["max_steps"]
    return {"config": config, "source": str(source), "world": 1, "rank": 0}


class _Clock:
    """Wall times for the file's entries, which record none: placed linearly by step between
    anchors known from the directory, each checkpoint's state file written at its step, and
    the start (``train_runtime`` before the last file, once training ended)."""

    def __init__(self, path: Path, files: list[Path], history: list[Any]) -> None:
        anchors: dict[int, float] = {}
        for file in files:
            step = _state_step(file)
            if step:
                anchors[step] = _mtime(file)
        last_file = max(files, key=_mtime)
        last_step = max(
            (e["step"] for e in history if isinstance(e, dict) and isinstance(e.get("step"), int)),
            default=0,
        )
        anchors.setdefault(last_step, _mtime(last_file))
        runtime = next(
            (e[SUMMARY_KEY] for e in history if isinstance(e, dict) and SUMMARY_KEY in e), None
        )
        self.end = max(anchors.values())
        if isinstance(runtime, (int, float)) and math.isfinite(runtime):
            anchors[0] = min(self.end - float(runtime), min(anchors.values()))
        self.points = sorted(anchors.items())
        self.start = self.points[0][1]

    def at(self, step: int | None) -> float:
        """The wall time of ``step``: interpolated between anchors, clamped at their ends."""
        points = self.points
        if step is None or step <= points[0][0]:
            return points[0][1]
        for (s0, t0), (s1, t1) in itertools.pairwise(points):
            if step <= s1:
                return t0 + (t1 - t0) * (step - s0) / max(1, s1 - s0)
        return points[-1][1]
