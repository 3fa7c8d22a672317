"""Finding runs: in the per-user registry of live runs, or under paths a person names.

A *run directory* holds ``rank-<N>.jsonl`` files; a *folder of runs* holds run directories (the
default ``./lmtop_runs`` is one). A path that does not exist yet is watched as a folder of runs,
so a viewer can be started before the training job.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmtop.hooks import registry, schema

RANK_FILE = schema.RANK_FILE


def rank_file(run_dir: Path, rank: int) -> Path:
    """The path of one rank's file in a run directory (the hook writes the same name)."""
    return run_dir / schema.rank_file(rank)


def ranks(run_dir: Path) -> list[int]:
    """The ranks whose files a run directory holds (no path objects: 10,000 ranks are cheap)."""
    found = []
    try:
        with os.scandir(run_dir) as entries:
            for entry in entries:
                match = RANK_FILE.match(entry.name)
                if match and entry.is_file():
                    found.append(int(match.group(1)))
    except OSError:
        pass
    return found


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds at least one rank file."""
    try:
        with os.scandir(path) as entries:
            return any(RANK_FILE.match(e.name) and e.is_file() for e in entries)
    except OSError:
        return False


def run_dirs(folder: Path) -> list[Path]:
    """The run directories directly inside ``folder``, oldest first."""
    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                # A dot-directory is a run being created (the hook renames it into place).
                if (
                    not entry.name.startswith(".")
                    and entry.is_dir()
                    and is_run_dir(Path(entry.path))
                ):
                    found.append(Path(entry.path))
    except OSError:
        pass
    return sorted(found, key=_mtime)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def live_runs() -> list[registry.Entry]:
    """Registry entries of this user's live publishing processes (one per rank)."""
    return registry.live_entries()


def resolve(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """Splits the paths a person gave into run directories and folders of runs to watch."""
    runs, folders = [], []
    for text in paths:
        path = Path(text).expanduser().absolute()
        if path.is_file() and RANK_FILE.match(path.name):
            runs.append(path.parent)
        elif path.is_dir() and is_run_dir(path):
            runs.append(path)
        else:
            folders.append(path)
    return runs, folders
