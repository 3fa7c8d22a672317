"""The columnar cache: a rank's decoded history beside its run file, so the next open is quick.

``rank-N.cols`` holds what the viewer made of ``rank-N.jsonl`` up to a byte offset: every
series of the rank as flat arrays (steps, times, values and the min/max pyramid, exactly as the
store held them) and the rank's state in the run book. The next viewer takes them and reads
the JSON lines from that offset on. The run file stays the truth: the cache is used only if the
file is at least as long as the offset and the CRC-32 of that prefix is the one recorded, and it
is rebuilt when in doubt; deleting it costs only time.

Format: a NumPy ``.npz`` of plain arrays (no pickled object, read with ``allow_pickle=False``);
the description is UTF-8 JSON in a ``uint8`` array. The run directory may be shared with a
group: the cache is written only into a directory of this user, as a new file (``O_EXCL``,
``O_NOFOLLOW``, mode 0600) renamed into place, and a cache that is not a regular file of this
user is treated as absent.
"""

from __future__ import annotations

import mmap
import os
import stat
import zlib
from array import array
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .owned import create_new, owned_dir_fd
from .runbook import RankState, Run, restore_events
from .runfile import RankFile

FORMAT = 2
SUFFIX = ".cols"
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def cache_name(rank: int) -> str:
    """The cache's file name for one rank."""
    return f"rank-{rank}{SUFFIX}"


def prefix_crc(path: Path, offset: int) -> int | None:
    """CRC-32 of the first ``offset`` bytes of a regular file; None if it is shorter or unreadable."""
    try:
        fd = os.open(path, _READ)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < offset:
            return None
        if offset == 0:
            return 0
        with mmap.mmap(fd, offset, prot=mmap.PROT_READ) as mapped:  # no copy of the file
            return zlib.crc32(mapped)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def save(
    run_dir: Path, rank: int, offset: int, meta: dict[str, Any], arrays: dict[str, array]
) -> bool:
    """Writes the cache of ``rank`` covering ``offset`` bytes of its run file; False if not
    written (a directory of another user, a file that changed, no space)."""
    crc = prefix_crc(run_dir / f"rank-{rank}.jsonl", offset)
    if crc is None:
        return False
    head = {"format": FORMAT, "offset": offset, "crc": crc, **meta}
    temp = f".{cache_name(rank)}.{os.getpid()}.tmp"
    try:
        dir_fd = owned_dir_fd(run_dir)
    except OSError:
        return False
    try:
        try:
            fd = create_new(dir_fd, temp)
        except FileExistsError:  # left by a viewer of this process id that was killed
            os.unlink(temp, dir_fd=dir_fd)
            fd = create_new(dir_fd, temp)
        try:
            with open(fd, "wb") as file:
                write(file, head, arrays)
            os.replace(temp, cache_name(rank), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(temp, dir_fd=dir_fd)
            raise
        return True
    except (OSError, ValueError):
        return False
    finally:
        os.close(dir_fd)


def load(run_dir: Path, rank: int) -> tuple[int, dict[str, Any], dict[str, array]] | None:
    """The cache of ``rank`` if it still describes its run file: (offset, description, arrays);
    None if absent, another user's, unreadable, or the file's covered prefix changed."""
    try:
        fd = os.open(run_dir / cache_name(rank), _READ)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        with open(fd, "rb", closefd=False) as file:
            head, arrays = read(file)
        if head.get("format") != FORMAT:
            return None
        offset = head["offset"]
        if prefix_crc(run_dir / f"rank-{rank}.jsonl", offset) != head["crc"]:
            return None
        return offset, head, arrays
    except Exception:  # a corrupt or foreign cache is no cache: the run file is read instead
        return None
    finally:
        os.close(fd)


# What of a rank's state in the run book the cache carries (the rest is the viewer's own).
_RANK_FIELDS = (
    "applied", "gaps", "messages", "info", "status", "error", "pid", "start_ticks", "host",
    "last_step", "started", "last_t", "problems", "points", "bad_seq", "file_seq", "ended",
)  # fmt: skip


def rank_state(run: Run, rank: RankState, file: RankFile) -> dict[str, Any] | None:
    """The rank's state as JSON, when it is exactly what its file's first ``offset`` bytes made
    (nothing applied from elsewhere, no line half read, no jump in doubt); else None."""
    if rank.applied != rank.file_seq or rank.jump is not None or file.has_partial:
        return None
    if rank.held is not None:  # a line read but not judged yet
        return None
    if rank.status is not None and not rank.ended:
        # Judged by this viewer (crashed, unknown), not said by the file: a later viewer judges
        # again (and raises the crash alert a plain read raises).
        return None
    if file.not_regular or file.offset == 0:
        return None
    pace = rank.pace
    return {
        "rank": {name: getattr(rank, name) for name in _RANK_FIELDS},
        "pace": {"step": pace.step, "t": pace.t, "recent": list(pace.recent)},
        "file": {
            "offset": file.offset,
            "bad_lines": file.bad_lines,
            "unsupported": file.unsupported,
        },
        "run": {"name": run.name, "world": run.world},
        # The rank's events (and with them any config given in one): the run's timeline.
        "events": [[e.step, e.t, e.text, e.data] for e in run.events if rank.rank in e.ranks],
    }


def restore_rank(run: Run, rank: RankState, file: RankFile, state: dict[str, Any]) -> None:
    """Puts back what :func:`rank_state` recorded (into a rank nothing was applied to yet)."""
    for name, value in state["rank"].items():
        setattr(rank, name, tuple(value) if name == "jump" and value else value)
    pace = rank.pace
    pace.step, pace.t = state["pace"]["step"], state["pace"]["t"]
    for step, seconds in state["pace"]["recent"]:
        pace.recent.append((step, seconds))
    for _, seconds in list(pace.recent)[-pace.window :]:  # the window is the latest intervals
        pace.intervals.add(seconds)
    file.offset = state["file"]["offset"]
    file.bad_lines = rank.bad_lines = state["file"]["bad_lines"]
    file.unsupported = state["file"]["unsupported"]
    if run.name == (run.dir.name if run.dir else None):
        run.name = state["run"]["name"]
    run.world = max(run.world, state["run"]["world"])
    restore_events(run, rank.rank, state.get("events", []))


def write(file: BinaryIO, head: dict[str, Any], arrays: dict[str, array]) -> None:
    """Writes a description and arrays of int64 and float64 as an ``.npz`` (nothing pickled):
    all columns of one type end to end in one member (a member per column costs more to read
    than its bytes), their places in the description."""
    import numpy as np

    places: dict[str, list[Any]] = {}
    blobs: dict[str, list[array]] = {"q": [], "d": []}
    used = {"q": 0, "d": 0}
    for name, data in arrays.items():
        code = data.typecode
        places[name] = [code, used[code], len(data)]
        blobs[code].append(data)
        used[code] += len(data)
    head = {**head, "columns": places}
    columns = {
        code: np.frombuffer(b"".join(parts), dtype=code) if parts else np.zeros(0, dtype=code)
        for code, parts in blobs.items()
    }
    columns["head"] = np.frombuffer(orjson.dumps(head), dtype=np.uint8)
    np.savez(file, **columns)  # type: ignore[arg-type]


def read(file: BinaryIO) -> tuple[dict[str, Any], dict[str, array]]:
    """What :func:`write` wrote; raises on anything else (``allow_pickle=False``)."""
    import numpy as np

    with np.load(file, allow_pickle=False) as npz:
        head = orjson.loads(npz["head"].tobytes())
        if type(head) is not dict:
            raise ValueError("not a cache")
        blobs = {}
        for code, dtype in (("q", "<i8"), ("d", "<f8")):
            blob = npz[code]
            if blob.dtype.str != dtype or blob.ndim != 1:
                raise ValueError("not a cache")
            blobs[code] = memoryview(blob.tobytes())
    arrays = {}
    for name, (code, start, length) in head["columns"].items():
        if length < 0 or start < 0 or (start + length) * 8 > len(blobs[code]):
            raise ValueError("a column beyond its member")
        column = arrays[name] = array(code)
        column.frombytes(blobs[code][start * 8 : (start + length) * 8])
    return head, arrays
