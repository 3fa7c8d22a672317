"""``e`` in the app: an SVG screenshot and a CSV of the shown run's series, into its directory.

Files are created new (``O_EXCL``) and never through a symbolic link (``O_NOFOLLOW``), with mode
0600, in the run directory when it is this user's and writable, else in the current directory.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import time
from pathlib import Path

from .runbook import RunView
from .store import Store


def folder_for(run: RunView) -> Path:
    """Where an export of ``run`` goes: its directory when this user owns it, else the cwd."""
    if run.dir is not None:
        try:
            info = os.lstat(run.dir)
        except OSError:
            info = None
        if (
            info is not None
            and stat.S_ISDIR(info.st_mode)
            and info.st_uid == os.getuid()
            and os.access(run.dir, os.W_OK)
        ):
            return run.dir
    return Path.cwd()


def write_new(path: Path, data: bytes) -> None:
    """Writes a file that must not exist yet, never through a symbolic link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def series_csv(store: Store, key: str) -> bytes:
    """Every point of every series of run ``key``: rank, metric, step, time, value."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", "metric", "step", "time", "value"])
    for (run, rank, metric), series in sorted(store.series.items()):
        if run != key:
            continue
        for step, t, value in zip(series.steps, series.times, series.values):
            writer.writerow([rank, metric, step, f"{t:.6f}", repr(value)])
    return out.getvalue().encode()


def export(run: RunView, svg: str, table: bytes) -> tuple[Path, Path]:
    """Writes ``lmtop-<time>.svg`` and ``.csv`` for ``run``; returns their paths.

    Raises:
        OSError: the folder cannot be written, or a file of that name already exists.
    """
    folder = folder_for(run)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    svg_path, csv_path = folder / f"lmtop-{stamp}.svg", folder / f"lmtop-{stamp}.csv"
    write_new(svg_path, svg.encode())
    write_new(csv_path, table)
    return svg_path, csv_path
