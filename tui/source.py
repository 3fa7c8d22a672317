"""Where the viewer's messages come from: one interface, a live implementation and an in-memory one.

The app and the headless printer read through :class:`Source`. :class:`~.follow.Follower` is the
real one (run files plus ZeroMQ); :class:`MemorySource` replays fixed messages for tests and
snapshots, through the same bookkeeping of runs and ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from lmtop.hooks import schema

from .follow import Follower, Run


class Source(Protocol):
    """A stream of messages and the state of the runs they belong to."""

    runs: dict[str, Run]
    bad_live: int

    def poll(self, timeout: float = 0.1) -> list[schema.Message]:
        """New messages since the last call, each once, in per-rank order."""
        ...

    @property
    def done(self) -> bool:
        """Whether nothing more will come."""
        ...

    def close(self) -> None:
        """Releases sockets and files."""
        ...


class MemorySource(Follower):
    """Replays fixed messages (or JSON lines) once, as if read from finished runs."""

    def __init__(self, messages: Iterable[schema.Message | bytes]) -> None:
        super().__init__(follow=False, live=False)
        self._use_registry = False
        self._pending: list[schema.Message] = []
        for item in messages:
            message = item if isinstance(item, schema.Message) else schema.decode(item)
            run = self._by_name.get(message.run)
            if run is None:
                run = Run(key=f"memory:{message.run}", name=message.run, dir=None)
                self.runs[run.key] = run
                self._by_name[message.run] = run
            self._apply(run, self._rank(run, message.rank), message, self._pending)
        for run in self.runs.values():
            for rank in run.ranks.values():
                rank.status = rank.status or "unknown"

    def poll(self, timeout: float = 0.1) -> list[schema.Message]:
        """Everything on the first call, nothing after."""
        self._scanned_once = True
        out, self._pending = self._pending, []
        return out

    @property
    def run_dir(self) -> Path | None:
        """Memory runs have no directory."""
        return None
