"""Runs nobody instrumented, logged for TensorBoard: ``events.out.tfevents.*`` scalars.

A Hugging Face ``Trainer`` writes them whenever tensorboard is installed (``report_to``'s default
then), as do Lightning and ``torch.utils.tensorboard``. The files are read with TensorBoard's own
reader (an optional extra, ``pip install 'lmtop[tensorboard]'``, so the base install stays
light); each step's scalars become one metrics message, built and checked by
:mod:`lmtop.hooks.schema` like a hooked run's, with the event's own wall time. A directory whose
event files grow is followed: the reader resumes where it stopped.

A *TensorBoard run* is a directory that holds event files (a Trainer's ``output/runs/<date>``);
all its files are one rank (0 of 1). Tags keep their names (``train/loss``, ``eval/loss``), which
:mod:`.metrics` knows.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtop.hooks import schema

from . import synthetic

EVENT_FILE = "events.out.tfevents."
MAX_DEPTH = 3  # output/runs/<date_host>/events...: how deep a path is searched


@functools.cache
def available() -> bool:
    """Whether TensorBoard's reader is installed."""
    try:
        import tensorboard.backend.event_processing.event_file_loader  # noqa: F401
    except ImportError:
        return False
    return True


def event_files(path: Path) -> list[Path]:
    """The event files directly inside ``path``, oldest first (by name: they start with time)."""
    try:
        with os.scandir(path) as entries:
            return sorted(
                Path(e.path) for e in entries if e.name.startswith(EVENT_FILE) and e.is_file()
            )
    except OSError:
        return []


def event_dirs(path: Path, depth: int = MAX_DEPTH) -> list[Path]:
    """The directories under ``path`` (itself included, ``depth`` levels) with event files."""
    found = [Path(os.path.realpath(path))] if event_files(path) else []
    if depth > 0:
        try:
            with os.scandir(path) as entries:
                subdirs = sorted(Path(e.path) for e in entries if e.is_dir())
        except OSError:
            subdirs = []
        for subdir in subdirs:
            found += event_dirs(subdir, depth - 1)
    return found


@dataclass(slots=True)
class TensorBoardRun:
    """One directory of event files, followed: a reader per file, resumed at each read."""

    dir: Path
    name: str = ""
    seq: int = 0
    loaders: dict[Path, Any] = field(default_factory=dict)
    bad: int = 0  # records that could not be read

    def __post_init__(self) -> None:
        if not self.name:
            # output/runs/Nov30_05-12-00_host: the output directory names the run.
            parent = self.dir.parent
            self.name = parent.parent.name if parent.name == "runs" else self.dir.name

    def read(self) -> list[schema.Message]:
        """The messages the event files hold beyond those already returned."""
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        out: list[schema.Message] = []
        if self.seq == 0:
            out.append(self._message("start", None, _first_time(self.dir), info=self._info()))
        for path in event_files(self.dir):
            loader = self.loaders.get(path)
            if loader is None:
                loader = self.loaders[path] = EventFileLoader(str(path))
            step_of: int | None = None
            t = 0.0
            m: dict[str, float] = {}
            try:
                for event in loader.Load():
                    scalars = _scalars(event)
                    if not scalars:
                        continue
                    if m and event.step != step_of:
                        out.append(self._message("metrics", step_of, t, m=m))
                        m = {}
                    step_of, t = int(event.step), float(event.wall_time)
                    m.update(scalars)
            except Exception:  # a truncated record at the end of a file being written
                self.bad += 1
            if m:
                out.append(self._message("metrics", step_of, t, m=m))
        return out

    def _info(self) -> dict[str, Any]:
        return {"config": {}, "source": str(self.dir), "world": 1, "rank": 0}

    def _message(self, kind: str, step: int | None, t: float, **fields: Any) -> schema.Message:
        self.seq += 1
        return synthetic.message(self.name or "tensorboard", self.seq - 1, kind, step, t, **fields)


def _scalars(event: Any) -> dict[str, float]:
    """The scalar values of one event (summary values of one number), by tag."""
    from tensorboard.util import tensor_util

    if not event.HasField("summary"):
        return {}
    found = {}
    for value in event.summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            found[value.tag] = float(value.simple_value)
        elif kind == "tensor":
            array = tensor_util.make_ndarray(value.tensor)
            if array.size == 1 and array.dtype.kind in "fiu":
                found[value.tag] = float(array.reshape(()))
    return {k: v for k, v in found.items() if k and len(k) <= schema.MAX_NAME_CHARS}


def _first_time(path: Path) -> float:
    """The start message's time: the first event file's (its name holds it; else its mtime)."""
    files = event_files(path)
    if not files:
        return 0.0
    parts = files[0].name[len(EVENT_FILE) :].split(".")
    if parts and parts[0].isdigit():
        return float(parts[0])
    try:
        return files[0].stat().st_mtime
    except OSError:
        return 0.0
