"""The CurveZMQ key that lets the nodes of a launch talk to each other, and nobody else.

One keypair per user, like an SSH key: ``$LMTOP_CURVE_SECRET`` (the Z85 secret key, for a
launcher that hands it to every node in their environment), else
``$XDG_CONFIG_HOME/lmtop/curve.key`` (``~/.config/lmtop/curve.key``), created with mode 0600 on
first use in a 0700 directory. Nodes that share a home directory share it; otherwise copy the
file the way an SSH key is copied. The key never travels over the network: the relay's CurveZMQ
handshake proves a node holds it without sending it.

The aggregator serves with this keypair and accepts only clients whose public key is its own;
a client proves it holds the secret key in the handshake.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

KEY_FILE = "curve.key"


class UnsafeKey(OSError):
    """The key cannot be used safely (another user's file, or open to others)."""


@dataclass(frozen=True, slots=True)
class Keypair:
    """A CurveZMQ keypair, both halves Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes


def key_path() -> Path:
    """``$XDG_CONFIG_HOME/lmtop/curve.key``, else ``~/.config/lmtop/curve.key``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "lmtop" / KEY_FILE


def load() -> Keypair:
    """This user's keypair, from the environment or the key file (created on first use).

    Raises:
        UnsafeKey: the key file is not this user's, or group or others may read it.
        ValueError: the key is not a Z85 CurveZMQ secret key.
    """
    import zmq

    secret = os.environ.get("LMTOP_CURVE_SECRET", "").strip().encode()
    if not secret:
        secret = _read_or_create(key_path())
    if len(secret) != 40:
        raise ValueError("a CurveZMQ secret key is 40 Z85 characters")
    return Keypair(zmq.curve_public(secret), secret)


def _read_or_create(path: Path) -> bytes:
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    import zmq

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _, secret = zmq.curve_keypair()
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secret + b"\n")
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a key another process (or node) made first
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return _read(path)


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise UnsafeKey(f"{path} is not a file of this user")
        if info.st_mode & 0o077:
            raise UnsafeKey(f"{path} may be read by others: chmod 600 it (or make a new one)")
        return os.read(fd, 256).strip()
    finally:
        os.close(fd)
