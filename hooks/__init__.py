"""The training side of lmtop: ``publish`` a step's metrics from any rank, never blocking.

    from lmtop import hooks
    hooks.publish({"loss": loss, "lr": lr, "grad_norm": grad_norm}, step=step)

``init`` is optional: the first ``publish`` reads the launch from the environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LMTOP_DIR``, ``LMTOP_RUN``, ``LMTOP_DISABLE``). ``finish`` runs by
itself at interpreter exit, with status ``error`` and the exception's summary after an uncaught
exception, or after ``sys.exit`` with a non-zero status or a message (also from a signal
handler). This module imports neither torch nor numpy nor the viewer.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import schema
from ._version import __version__
from .identity import default_run_name, identity, safe_name
from .publisher import Problems, Publisher

if TYPE_CHECKING:
    from .accelerate import LmtopTracker
    from .trainer import LmtopCallback

__all__ = [
    "LmtopCallback",
    "LmtopTracker",
    "__version__",
    "current",
    "event",
    "finish",
    "init",
    "publish",
    "schema",
    "stats",
]

_publisher: Publisher | None = None
_init_lock = threading.Lock()
_disabled = False
_error: str | None = None  # the uncaught exception's summary, or why sys.exit was called
_hooks_installed = False
_problems = Problems()  # before there is a publisher to count them


def _env_disabled() -> bool:
    return os.environ.get("LMTOP_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def init(
    run: str | None = None,
    config: Mapping[str, Any] | None = None,
    dir: str | os.PathLike[str] | None = None,
) -> str | None:
    """Starts this rank's run, finishing one already started; returns the run's name.

    Args:
        run: the run's name; default ``$LMTOP_RUN``, else one shared by all ranks of the launch.
        config: hyper-parameters to record in the ``start`` message.
        dir: the folder of runs; default ``$LMTOP_DIR``, else ``./lmtop_runs``.
    """
    with _init_lock:
        return _init_locked(run, config, dir)


def _init_locked(
    run: str | None,
    config: Mapping[str, Any] | None,
    dir: str | os.PathLike[str] | None,
) -> str | None:
    global _publisher, _disabled
    if _publisher is not None:
        _publisher.finish()
        _publisher = None
    _disabled = _env_disabled()
    if _disabled:
        return None
    try:
        who = identity()
        name = safe_name(run or os.environ.get("LMTOP_RUN") or default_run_name(who), 120)
        folder = Path(dir or os.environ.get("LMTOP_DIR") or "lmtop_runs").absolute()
        _publisher = Publisher(name, who, folder, config)
    except Exception as exc:  # never into the training loop
        _disabled = True
        print(f"lmtop: disabled, cannot start: {exc!r}", file=sys.stderr)
        return None
    _install_exit_hooks()
    return _publisher.run


def publish(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Records one step's metrics (numbers: int, float, bool, numpy scalars, 0-d tensors).

    ``step`` defaults to the previous step plus one. Never raises and never blocks: values that
    are not numbers, names over 200 characters and messages over 64 KiB are dropped and counted.
    """
    publisher = _publisher
    if publisher is None:
        if _disabled or _start() is None:
            return
        publisher = _publisher
        if publisher is None:  # finished by another thread meanwhile
            return
    publisher.publish(metrics, step)


def event(text: str, step: int | None = None, data: Mapping[str, Any] | None = None) -> None:
    """Records an event: a checkpoint saved, an evaluation done, or any line of text."""
    publisher = _publisher
    if publisher is None:
        if _disabled or _start() is None:
            return
        publisher = _publisher
        if publisher is None:  # finished by another thread meanwhile
            return
    publisher.event(text, step, data)


def finish(status: str = "ok", error: str | None = None) -> None:
    """Ends this rank's run with ``status`` (``"ok"`` or ``"error"``). Runs by itself at exit."""
    global _publisher
    publisher = _publisher
    if publisher is not None:
        publisher.finish(status, error)
        if not publisher.forked:
            _publisher = None


def current() -> Publisher | None:
    """This process's publisher, or None before the first ``publish`` or after ``finish``."""
    return _publisher


def stats() -> dict[str, int]:
    """Problems counted so far by this rank's publisher, by kind; empty when all is well."""
    publisher = _publisher
    counts = dict(_problems.counts)
    if publisher is not None:
        counts.update(publisher.problems.counts)
    return counts


def _start() -> str | None:
    """Starts the run at the first publish; threads racing here start one run between them.

    A multiprocessing child (a DataLoader worker started by spawn or forkserver) starts none:
    it would be a run of its own, and the newest run is the one ``lmtop`` shows. ``init()``
    called in the child, or an initialised torch.distributed (a rank started by
    ``torch.multiprocessing.spawn``), says it is a rank.
    """
    global _disabled
    with _init_lock:
        if _publisher is not None:
            return _publisher.run
        if _disabled:
            return None
        if _worker_process():
            _disabled = True
            _problems(
                "publish() in a multiprocessing child that did not call init() is ignored "
                "(publish from the training process, or call lmtop.hooks.init() in the child)",
                f"pid {os.getpid()}",
            )
            return None
        return _init_locked(None, None, None)


def _worker_process() -> bool:
    """Whether this process is a multiprocessing child that is not a distributed rank."""
    try:
        mp = sys.modules.get("multiprocessing")  # a child has imported it; others need not
        if mp is None or mp.parent_process() is None:
            return False
        dist = sys.modules.get("torch.distributed")
        return not (dist is not None and dist.is_available() and dist.is_initialized())
    except Exception:
        return False


def _install_exit_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_at_exit)
    previous = sys.excepthook

    def excepthook(
        kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        global _error
        _error = traceback.format_exception_only(kind, value)[-1].strip()
        previous(kind, value, tb)

    sys.excepthook = excepthook
    sys.exit = _exit_recorder(sys.exit)
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _exit_recorder(exit_: Any) -> Any:
    """``sys.exit`` that first notes a failing status for the ``end`` message.

    SystemExit never reaches ``sys.excepthook`` and ``atexit`` cannot see the status, so this is
    where ``sys.exit(3)`` or ``sys.exit("fatal: CUDA OOM")`` is seen. Only the main thread's exit
    ends the process; ``raise SystemExit(3)`` written out is not seen.
    """

    def exit(status: object = None) -> None:
        global _error
        if threading.current_thread() is threading.main_thread():
            if status is None or status == 0:
                _error = None
            elif isinstance(status, int):
                _error = f"exit status {status}"
            else:
                _error = f"{str(status)[:1000]} (exit status 1)"
        exit_(status)

    exit.__doc__ = exit_.__doc__
    return exit


def _at_exit() -> None:
    if _error is not None:
        finish("error", _error)
    else:
        finish("ok")


def _after_fork_in_child() -> None:
    publisher = _publisher
    if publisher is not None:
        publisher.after_fork_in_child()


def __getattr__(name: str) -> Any:
    # The integrations import their frameworks; load them only when asked for.
    if name == "LmtopCallback":
        from .trainer import LmtopCallback

        return LmtopCallback
    if name == "LmtopTracker":
        from .accelerate import LmtopTracker

        return LmtopTracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
