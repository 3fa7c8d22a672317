"""``e`` in the app: an SVG screenshot and a CSV of the shown run's series, into its directory.

Files are created new, mode 0600, never through a symbolic link (see :mod:`.owned`), in the run
directory when it is this user's, else in the current directory.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

from .owned import create_new, owned_dir_fd
from .runbook import RunView
from .store import Store


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
    folder = run.dir if run.dir is not None else Path.cwd()
    try:
        fd = owned_dir_fd(folder)
    except OSError:  # another user's run, or a link: the current directory instead
        folder = Path.cwd()
        fd = owned_dir_fd(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = (f"lmtop-{stamp}.svg", f"lmtop-{stamp}.csv")
    try:
        for name, data in zip(names, (svg.encode(), table)):
            with os.fdopen(create_new(fd, name), "wb") as file:
                file.write(data)
    finally:
        os.close(fd)
    return folder / names[0], folder / names[1]
