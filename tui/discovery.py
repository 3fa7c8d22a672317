"""Finding runs: in the per-user registry of live runs, or under paths a person names.

A *run directory* holds ``rank-<N>.jsonl`` files; a *folder of runs* holds run directories (the
default ``./lmtop_runs`` is one). A path that does not exist yet is watched as a folder of runs,
so a viewer can be started before the training job.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmtop.hooks import registry, schema

from . import tensorboard_events, trainer_state

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


def nothing_readable(paths: list[str], cwd: Path | None = None) -> str:
    """Why nothing is shown yet, in one line: what the paths hold, and where runs are.

    ``lmtop /does-not-exist``, an empty folder or a ``.txt`` file say so (the path is still
    watched: a job may create it), and with no path, a ``./lmtop_runs`` that holds runs is named.
    """
    said = []
    for text in paths:
        path = Path(text).expanduser()
        if not path.exists():
            said.append(f"{text} does not exist (watching for it)")
        elif path.is_file():
            said.append(
                f"{text} is not a file lmtop can read (it reads rank-N.jsonl run files, "
                "run folders and Trainer output folders with trainer_state.json)"
            )
        elif not run_dirs(path) and not trainer_state.trainer_dirs(path):
            if not tensorboard_events.event_dirs(path):
                said.append(f"{text} holds no runs lmtop can read (watching it)")
            elif not tensorboard_events.available():
                said.append(
                    f"{text} holds TensorBoard event files: pip install 'lmtop[tensorboard]' "
                    "to read them"
                )
    if not paths:
        said.append("no live run of this user yet (start a job that calls lmtop.hooks.publish)")
    local = (cwd or Path.cwd()) / "lmtop_runs"
    if not paths or not any(Path(p).expanduser().absolute() == local.absolute() for p in paths):
        found = len(run_dirs(local))
        if found:
            said.append(f"./lmtop_runs holds {found} run{'s' * (found != 1)}: lmtop lmtop_runs")
    return "; ".join(said)
