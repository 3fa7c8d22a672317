"""``LmtopTracker``: lmtop as an ``accelerate`` tracker, and a way to hear every rank.

    tracker = LmtopTracker()
    accelerator = Accelerator(log_with=tracker)
    accelerator.init_trackers("my-run", config={"learning_rate": 3e-4})  # the run's config
    accelerator.log({"loss": loss}, step=step)                           # the main process

**Only the main process.** ``Accelerator.init_trackers`` and ``Accelerator.log`` run on the main
process alone (both are ``@on_main_process`` on the ``Accelerator``), whatever the tracker's
``main_process_only`` says, so through them lmtop sees rank 0 only. For every rank, use the two
helpers here in their place; they call ``accelerate`` exactly as before on the main process
(every other tracker keeps working) and publish from the other ranks themselves:

    init_every_rank(accelerator, "my-run", config=config)
    log_every_rank(accelerator, {"loss": loss}, step=step)

Or call ``lmtop.hooks.publish`` on each rank: it is per-rank already. Values may be tensors:
CUDA ones are read without a synchronisation (see ``lmtop.hooks.tensors``), where
``accelerator.log`` needs ``.item()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from accelerate.tracking import GeneralTracker

from . import current, event, finish, init, publish
from .publisher import Publisher


class LmtopTracker(GeneralTracker):
    """lmtop as an ``accelerate`` tracker: ``Accelerator(log_with=LmtopTracker())``.

    Args:
        run: the run's name; default ``$LMTOP_RUN``, else one shared by all ranks of the launch
            (not the project name given to ``init_trackers``: ranks would not agree on a suffix).
        dir: the folder of runs; default ``$LMTOP_DIR``, else ``./lmtop_runs``.
    """

    name = "lmtop"
    requires_logging_directory = False
    # Ask accelerate to call this tracker on every process; Accelerator.log still calls it on the
    # main process only (see the module's docstring), the helpers here on the others.
    main_process_only = False

    def __init__(self, run: str | None = None, dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.run = run
        self.dir = dir
        self._own_run: str | None = None

    @property
    def tracker(self) -> Publisher | None:
        """This rank's publisher (None before the first message)."""
        return current()

    def start(self) -> None:
        """Nothing to do: the run starts with its config, or with its first message."""

    def store_init_configuration(self, values: Mapping[str, Any]) -> None:
        """Starts this rank's run with ``values`` as its config (or records them as an event)."""
        publisher = current()
        if publisher is None or publisher.run == self._own_run:
            self._own_run = init(run=self.run, config=dict(values), dir=self.dir)
        else:  # the script started its run before: keep it, record the config beside it
            event("configuration", data={"config": dict(values)})

    def log(self, values: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Publishes ``values`` (numbers or tensors) at ``step``; strings are left out."""
        publish({k: v for k, v in values.items() if not isinstance(v, str)}, step=step)

    def finish(self) -> None:
        """Ends this rank's run (``Accelerator.end_training``)."""
        finish()


def _own_tracker(accelerator: Any) -> LmtopTracker | None:
    """The LmtopTracker the accelerator was built with, on any rank."""
    for tracker in [*getattr(accelerator, "trackers", ()), *getattr(accelerator, "log_with", ())]:
        if isinstance(tracker, LmtopTracker):
            return tracker
    return None


def init_every_rank(
    accelerator: Any,
    project_name: str,
    config: Mapping[str, Any] | None = None,
    init_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """``accelerator.init_trackers`` on the main process; the lmtop run, config and all, on all.

    Without an ``LmtopTracker`` among the accelerator's trackers, lmtop is started directly.
    """
    accelerator.init_trackers(project_name, config=config, init_kwargs=dict(init_kwargs or {}))
    tracker = _own_tracker(accelerator)
    if accelerator.is_main_process and tracker is not None and config is not None:
        return  # init_trackers gave it the config
    if tracker is None:
        tracker = LmtopTracker()
    tracker.store_init_configuration(dict(config or {}))


def log_every_rank(
    accelerator: Any,
    values: Mapping[str, Any],
    step: int | None = None,
    log_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """``accelerator.log`` on the main process (every tracker, as before); lmtop on every rank.

    ``values`` go to the other trackers as given. lmtop itself takes tensors, and reads CUDA ones
    without a synchronisation.
    """
    tracker = _own_tracker(accelerator)
    if accelerator.is_main_process:
        accelerator.log(dict(values), step=step, log_kwargs=dict(log_kwargs or {}))
        if tracker is not None and tracker in accelerator.trackers:
            return  # accelerator.log reached it
    if tracker is not None:
        tracker.log(values, step=step)
    else:
        publish(values, step=step)
