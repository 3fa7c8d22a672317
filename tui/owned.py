"""Writing files on a shared machine: only into directories of this user, never through a link.

The viewer writes alert snapshots and exports beside runs that another user could have prepared.
Every directory on the way is opened without following a symbolic link and checked to belong to
this user, and the file itself is created new (``O_EXCL``), mode 0600, relative to that opened
directory, so nothing can be swapped in between the check and the write.
"""

from __future__ import annotations

import os
from pathlib import Path

_NO_FOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def owned_dir_fd(path: str | Path, dir_fd: int | None = None) -> int:
    """Opens a directory of this user, not a symlink; raises PermissionError otherwise."""
    fd = os.open(path, _NO_FOLLOW_DIR, dir_fd=dir_fd)
    if os.fstat(fd).st_uid != os.getuid():
        os.close(fd)
        raise PermissionError(f"{path}: not owned by this user")
    return fd


def create_new(dir_fd: int, name: str) -> int:
    """A new file ``name`` in the opened directory (mode 0600), open for writing."""
    return os.open(name, _NEW_FILE, 0o600, dir_fd=dir_fd)
