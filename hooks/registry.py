"""The per-user registry of live runs, and the runtime directory that holds it.

Each publishing process writes ``<runtime>/<pid>.json`` (its run, rank, run directory and ZeroMQ
endpoint) and binds its socket at ``<runtime>/<pid>.sock``. The runtime directory is private to
the user (mode 0700): ``$LMTOP_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/lmtop``, else
``/tmp/lmtop-<uid>``. A viewer started in any directory lists the entries of *every* candidate
(a job started by cron or in a container, without ``XDG_RUNTIME_DIR``, registers under ``/tmp``)
and ignores those whose process is gone (a pid is matched with its start time, so a reused pid is
not mistaken for it). A candidate that is not a directory owned by the user with mode 0700 is
skipped unread, by the viewer as by the hook: another user could have pre-created it.

An entry holds ``pid``, ``start_ticks``, ``host``, ``run``, ``rank``, ``world``, ``endpoint``,
``started`` and ``dir``: the run directory the rank writes to, or would write to when it cannot
(``live_only`` is then true and only the live socket carries its messages). Global rank 0 of a
launch that spans nodes also registers each rank it relays from another ``node``, as
``<pid>.<rank>.json`` with its socket ``<pid>.<rank>.sock``, ``unreachable`` while that node's
link is down.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import TypedDict

import orjson

# sockaddr_un.sun_path is 108 bytes on Linux, 104 on macOS, including the terminating NUL.
MAX_IPC_PATH = 100


class RuntimeDirError(OSError):
    """The runtime directory cannot be used safely (owned by another user, or open to others)."""


def _candidates() -> list[Path]:
    explicit = os.environ.get("LMTOP_RUNTIME_DIR")
    if explicit:
        return [Path(explicit)]
    found = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        found.append(Path(xdg) / "lmtop")
    found.append(Path(tempfile.gettempdir()) / f"lmtop-{os.getuid()}")
    if str(found[-1]) != f"/tmp/lmtop-{os.getuid()}":
        found.append(Path(f"/tmp/lmtop-{os.getuid()}"))  # short, when $TMPDIR is long
    return found


def _make_private(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = _owned_dir(path)
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _owned_dir(path: Path) -> os.stat_result:
    """The lstat of ``path``; raises RuntimeDirError unless it is a directory of this user."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RuntimeDirError(f"{path} is not a directory owned by this user")
    return info


def _private(path: Path) -> bool:
    """Whether a viewer may read ``path``: this user's directory, closed to others (0700)."""
    try:
        return not _owned_dir(path).st_mode & 0o077
    except OSError:
        return False


def runtime_dir(create: bool = True) -> Path:
    """Returns the user's private runtime directory, creating it (mode 0700) when asked.

    Raises:
        RuntimeDirError: no candidate is safe and short enough for ipc socket paths.
    """
    problems = []
    for path in _candidates():
        if len(str(path)) + len("/4194304.sock") > MAX_IPC_PATH:
            problems.append(f"{path}: too long for an ipc socket path")
            continue
        if not create:
            return path
        try:
            return _make_private(path)
        except OSError as exc:
            problems.append(f"{path}: {exc}")
    raise RuntimeDirError("; ".join(problems))


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process ``pid`` runs on this host and, when given, started at ``start_ticks``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # none, or no pid at all (past the C int)
        return False
    except PermissionError:
        pass  # alive, but another user's
    if start_ticks is None:
        return True
    now = process_start_ticks(pid)
    if now is None:
        return os.path.exists("/proc") is False  # no procfs: trust kill(0)
    # A zombie child that has not been reaped still exists; it no longer publishes anything.
    return now == start_ticks and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return True
    return raw[raw.rfind(b")") + 2 : raw.rfind(b")") + 3] in (b"Z", b"X")


class Entry(TypedDict, total=False):
    """One publishing process (one rank), as ``<runtime>/<pid>.json`` holds it."""

    pid: int
    start_ticks: int | None  # the process's start time in clock ticks, against pid reuse
    host: str
    run: str  # the run's name (for display)
    rank: int
    world: int
    dir: str  # the run directory it writes (or would write, when live_only)
    live_only: bool  # the run directory could not be written: only the socket carries it
    endpoint: str  # ipc://<runtime>/<pid>.sock
    started: float  # wall time it registered
    ended: float  # wall time it finished (the entry is kept ENDED_KEEP_SECONDS for viewers)
    node: int  # a rank of another node, relayed by this process (see hooks/aggregator.py)
    unreachable: bool  # that node's link is down: its rank is not silent, just out of reach


def register(entry: Entry, name: str | None = None) -> Path:
    """Writes a registry entry atomically; returns its path. ``name`` (default the pid) names
    the file: the aggregator of several nodes registers each rank it relays as ``<pid>.<rank>``."""
    directory = runtime_dir()
    name = name or str(entry["pid"])
    path = directory / f"{name}.json"
    tmp = directory / f".{name}.json.tmp"
    tmp.write_bytes(orjson.dumps(entry))
    os.replace(tmp, path)
    return path


# A finished run's entry stays this long, so a viewer that was already watching, or starts
# right after, still finds a run that began and ended between two of its scans.
ENDED_KEEP_SECONDS = 60.0


def mark_ended(path: Path) -> None:
    """Rewrites a registry entry as ended (kept ENDED_KEEP_SECONDS for viewers, then removed)."""
    try:
        entry = orjson.loads(path.read_bytes())
        entry["ended"] = time.time()
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(orjson.dumps(entry))
        os.replace(tmp, path)
    except (OSError, ValueError, TypeError, orjson.JSONDecodeError):
        unregister(path)


def unregister(path: Path) -> None:
    """Removes a registry entry; a missing entry is not an error."""
    with contextlib.suppress(OSError):
        path.unlink()


def live_entries() -> list[Entry]:
    """Registry entries of processes that are still alive (or ended less than a minute ago:
    ``"ended"`` holds when), from every safe candidate directory, one per pid, oldest first.

    Entries of dead processes are ignored and removed, with their sockets. A candidate that is
    not this user's private directory is not read at all.
    """
    entries: dict[tuple[int, int], Entry] = {}  # by (pid, rank): an aggregator relays several
    for directory in dict.fromkeys(_candidates()):
        if not _private(directory):
            continue
        try:
            paths = list(directory.glob("*.json"))
        except OSError:
            continue
        for path in paths:
            try:
                entry = orjson.loads(path.read_bytes())
                pid, ticks = int(entry["pid"]), entry.get("start_ticks")
                key = (pid, int(entry.get("rank", 0)))
                entry["run"], entry["dir"], entry["endpoint"]
            except (OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
                continue
            if key in entries:
                continue
            ended = entry.get("ended")
            if isinstance(ended, (int, float)):  # finished: kept a while for late viewers
                if time.time() - ended < ENDED_KEEP_SECONDS:
                    entries[key] = entry
                else:
                    unregister(path)
            elif pid_alive(pid, ticks):
                entries[key] = entry
            else:
                unregister(path)
                unregister(directory / f"{path.name.removesuffix('.json')}.sock")
    return sorted(entries.values(), key=_order)


def _order(entry: Entry) -> tuple[float, float]:
    """Oldest first, then by rank; a field that is not a number (another version's entry)
    counts as 0."""
    started, rank = entry.get("started"), entry.get("rank")
    return (
        started if isinstance(started, (int, float)) else 0.0,
        rank if isinstance(rank, (int, float)) else 0.0,
    )
