"""Reading one rank's run file, ``rank-<N>.jsonl``, from where the last read stopped.

A writer appends whole lines, but a reader may arrive in the middle of one, and a process killed
mid-write (or a full disk) leaves a partial line behind. An incomplete last line is kept until its
newline arrives; lines that are not protocol messages are skipped and counted, never raised.

The file is opened without blocking and must be a regular file: anyone who can write the run
directory could put a FIFO (an ``open`` that never returns) or a device in a rank file's place.
Such a file is not read; each time it is found in place of the file it counts as one bad line.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

from lmtop.hooks import schema

# Read at most this much per call, so a huge history arrives in pieces and the screen stays alive.
READ_CHUNK = 4 << 20
# A "line" this long without a newline is not a message: drop it and resynchronise at the next one.
MAX_PARTIAL = 2 * schema.MAX_MESSAGE_BYTES


# Never waits on a FIFO, never becomes a controlling terminal, never outlives an exec.
_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def last_line(path: Path, tail: int = 4096) -> bytes | None:
    """The last line of a rank file, read as :class:`RankFile` reads (a regular file only), at
    most ``tail`` bytes back; None when it cannot be read or is not a regular file."""
    chunk = read_range(path, -tail, None)
    return None if chunk is None else chunk.rstrip(b"\n").rsplit(b"\n", 1)[-1]


def read_range(path: Path, start: int, end: int | None) -> bytes | None:
    """Bytes ``start`` to ``end`` of a rank file (a negative ``start``: that many back from
    ``end``, None: the file's end), read as :class:`RankFile` reads (a regular file only); None
    when it cannot be read or is not a regular file."""
    try:
        fd = os.open(path, _OPEN)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        stop = info.st_size if end is None else min(end, info.st_size)
        begin = max(0, stop + start if start < 0 else start)
        return os.pread(fd, max(0, stop - begin), begin)
    except OSError:
        return None
    finally:
        os.close(fd)


class RankFile:
    """Incremental reader of one rank's JSON-lines file."""

    def __init__(self, path: Path, rank: int | None = None) -> None:
        self.path = path
        self.rank = rank
        self.offset = 0
        self.size = 0  # the file's size at the last read: what is left to read is size - offset
        self.bad_lines = 0
        self.unsupported: str | None = None  # the first "unsupported version" complaint
        self.not_regular = False  # the path holds a FIFO, a device, a directory...: not read
        self._partial = b""
        self._skipping = False  # inside an over-long line: drop bytes up to the next newline

    @property
    def lines_end(self) -> int:
        """Where the last complete line read ends: bytes up to here were all given out as lines
        (an incomplete last line waits beyond it)."""
        return self.offset - len(self._partial)

    @property
    def has_partial(self) -> bool:
        """Whether an incomplete last line is waiting for its newline."""
        return bool(self._partial) or self._skipping

    def read(self, limit: int = READ_CHUNK) -> tuple[list[schema.Message], bool]:
        """Returns the messages of the complete lines added since the last call, and whether
        more bytes are waiting beyond ``limit``."""
        lines, more = self.read_lines(limit)
        return self.decode_lines(lines), more

    def read_lines(self, limit: int = READ_CHUNK) -> tuple[list[bytes], bool]:
        """The complete lines added since the last call, undecoded (as :meth:`read` takes them),
        and whether more bytes are waiting beyond ``limit``."""
        try:
            fd = os.open(self.path, _OPEN)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a unix socket in the file's place
                self._refuse()
            return [], False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                self._refuse()
                return [], False
            self.not_regular = False
            size = self.size = info.st_size
            if size < self.offset:  # truncated or replaced: start again
                self.offset, self._partial, self._skipping = 0, b"", False
            chunk = (
                os.pread(fd, min(limit, size - self.offset), self.offset)
                if size > self.offset
                else b""
            )
            if len(chunk) < min(READ_CHUNK, size - self.offset) and b"\n" not in chunk:
                # A small read inside one long line: read on to READ_CHUNK, as a full read
                # would, so the lines kept do not depend on how the reads are sized.
                end = self.offset + min(READ_CHUNK, size - self.offset)
                chunk += os.pread(fd, end - self.offset - len(chunk), self.offset + len(chunk))
        except OSError:
            return [], False
        finally:
            os.close(fd)
        self.offset += len(chunk)
        return self._split(chunk), self.offset < size

    def _refuse(self) -> None:
        """Not a regular file: counted once each time one appears in the file's place."""
        if not self.not_regular:
            self.not_regular = True
            self.bad_lines += 1

    def _split(self, chunk: bytes) -> list[bytes]:
        """The complete lines of ``chunk`` after what was kept of the last one."""
        if not chunk:
            return []
        if self._skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                return []
            chunk, self._skipping = chunk[newline + 1 :], False
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_PARTIAL:
            self.bad_lines += 1
            self._partial, self._skipping = b"", True
        return lines

    def decode_lines(
        self, lines: list[bytes], docs: list[Any] | None = None
    ) -> list[schema.Message]:
        """Decodes complete lines, skipping and counting those that are not messages; ``docs``:
        each line's JSON value, already parsed (None where it is not JSON), not parsed again."""
        messages = []
        for index, line in enumerate(lines):
            if not line or line.isspace():
                continue
            try:
                if docs is None:
                    message = schema.decode(line)
                elif docs[index] is None:  # not JSON, or the JSON null: no message either way
                    raise schema.BadMessage("not JSON")
                else:
                    message = schema.validate(docs[index])
            except schema.UnsupportedVersion as exc:
                self.bad_lines += 1
                self.unsupported = self.unsupported or str(exc)
                continue
            except schema.BadMessage:
                self.bad_lines += 1
                continue
            if self.rank is not None and message.rank != self.rank:
                self.bad_lines += 1
                continue
            messages.append(message)
        return messages

    def close(self) -> None:
        """The writer is gone: an incomplete last line will never complete; count it."""
        if self.has_partial:
            self.bad_lines += 1
            self._partial, self._skipping = b"", False
