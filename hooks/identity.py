"""Who is publishing: rank, world size and the run name, read from the launcher's environment.

All ranks of one launch must agree on the run name without being told it. ``torchrun`` and
``accelerate launch`` start every rank of a node as children of one launcher process, so the name
is derived from that parent (its pid and start time). ``TORCHELASTIC_RUN_ID`` is ``none`` and
``MASTER_PORT`` is 29500 by default under accelerate, so neither identifies a launch on its own.
A single process is its own anchor. Names look like ``train-20261124-193512-1a2b``. A launch
that spans nodes shares no process: its name and key come from what every node of it is given
(the rendezvous id, the SLURM job step, or MASTER_ADDR:MASTER_PORT; see :func:`launch_key`).

The same anchor is the launch's key (:func:`launch_key`), recorded in each rank's ``start``
message and in a ``.launch`` file in the run directory; with a rendezvous id
(``TORCHELASTIC_RUN_ID`` other than ``none``) the key is that id and the restart count instead,
the same on every node. The publisher uses the key to decide an explicit name that already
exists once per launch (see ``Publisher._open``).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import time
from dataclasses import dataclass

from .registry import process_start_ticks

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class Identity:
    """Where this process stands in its launch."""

    rank: int
    local_rank: int
    world: int
    launched: bool  # started by a launcher (torchrun, accelerate) as one of several ranks
    launch: str = ""  # a short id shared by every rank of this launch (see launch_key)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def identity() -> Identity:
    """Reads rank, local rank and world size from the torchrun/accelerate environment."""
    world = max(1, _env_int("WORLD_SIZE", 1))
    rank = max(0, _env_int("RANK", 0))
    local_rank = max(0, _env_int("LOCAL_RANK", rank))
    launched = "LOCAL_RANK" in os.environ or world > 1
    launch = hashlib.sha1(launch_key(launched).encode()).hexdigest()[:12]
    return Identity(rank, local_rank, world, launched, launch)


def safe_name(text: str, limit: int = 80) -> str:
    """A name usable as one path component: letters, digits, ``.``, ``_`` and ``-``."""
    cleaned = _UNSAFE.sub("-", text).strip("-.")[:limit]
    return cleaned or "run"


def script_name() -> str:
    """The training script's name, as a person would call the run."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-") else "python"
    base = os.path.basename(argv0)
    stem = base[:-3] if base.endswith(".py") else base
    if stem == "__main__":  # python -m package
        stem = os.path.basename(os.path.dirname(argv0)) or "python"
    return safe_name(stem, 40)


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _started_at(pid: int, ticks: int | None) -> float:
    boot = _boot_time()
    if ticks is None or boot is None:
        return time.time()
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _anchor(launched: bool) -> tuple[int, int | None, str]:
    """The process every rank of this launch on this node shares: (pid, start ticks, key)."""
    anchor = os.getppid() if launched else os.getpid()
    ticks = process_start_ticks(anchor)
    key = f"{socket.gethostname()}:{anchor}:{ticks}"
    if ticks is None and not launched:
        key += f":{time.time_ns()}"  # no procfs: the pid and the clock make it unique
    return anchor, ticks, key


def multi_node() -> bool:
    """Whether this launch spans several nodes (torchrun's GROUP_WORLD_SIZE, SLURM, or more
    ranks in the world than on this node)."""
    nodes = max(_env_int("GROUP_WORLD_SIZE", 1), _env_int("SLURM_NNODES", 1), _env_int("NNODES", 1))
    local = _env_int("LOCAL_WORLD_SIZE", 0)
    return nodes > 1 or (local > 0 and _env_int("WORLD_SIZE", 1) > local)


def launch_key(launched: bool) -> str:
    """What identifies this launch to all its ranks, on every node: the rendezvous id where the
    launcher has one; across nodes without one, the SLURM job step or the rendezvous endpoint
    (MASTER_ADDR:MASTER_PORT, which every node of a launch is given); on one node, the launcher
    process (or this process, when alone)."""
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if launched and elastic and elastic != "none":
        return f"elastic:{elastic}:{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if launched and multi_node():
        job = os.environ.get("SLURM_JOB_ID")
        if job:
            return f"slurm:{job}.{os.environ.get('SLURM_STEP_ID', '0')}"
        master = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
        if master != ":":
            return f"master:{master}"
    return _anchor(launched)[2]


def default_run_name(who: Identity) -> str:
    """A readable name shared by every rank of this launch: ``train-20261124-193512-1a2b`` on
    one node; across nodes, where no process is shared, ``train-20261124-1a2b3c`` from the
    launch key (the day in UTC, so nodes whose clocks differ by seconds still agree)."""
    if who.launched and multi_node():
        key = launch_key(True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:6]
        return f"{script_name()}-{time.strftime('%Y%m%d', time.gmtime())}-{digest}"
    anchor, ticks, key = _anchor(who.launched)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(_started_at(anchor, ticks)))
    digest = hashlib.sha1(key.encode()).hexdigest()[:4]
    return f"{script_name()}-{stamp}-{digest}"
