"""Where the viewer's messages come from: one interface, a live implementation and an in-memory one.

The app and the headless printer read through :class:`Source`. :class:`~.follow.Follower` is the
real one (run files plus ZeroMQ); :class:`MemorySource` replays fixed messages for tests and
snapshots, through the same :class:`~.runbook.RunBook`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from lmtop.hooks import schema

from .follow import Keyed
from .runbook import RunBook


class Source(Protocol):
    """A stream of messages, each with its run's key, and the book of the runs they belong to."""

    book: RunBook
    bad_live: int

    def poll(self, timeout: float = 0.1) -> list[Keyed]:
        """New messages since the last call, each once, in per-rank order."""
        ...

    @property
    def catching_up(self) -> bool:
        """Whether a long history is still being read."""
        ...

    @property
    def done(self) -> bool:
        """Whether nothing more will come."""
        ...

    def close(self) -> None:
        """Releases sockets and files."""
        ...


class MemorySource:
    """Replays fixed messages (or JSON lines) once, as if read from finished runs.

    A run's key is ``memory:<name>``: fixed data has no directory.
    """

    def __init__(self, messages: Iterable[schema.Message | bytes]) -> None:
        self.book = RunBook()
        self.bad_live = 0
        self._pending: list[Keyed] = []
        self._polled = False
        for item in messages:
            message = item if isinstance(item, schema.Message) else schema.decode(item)
            run = self.book.run(f"memory:{message.run}", message.run, None)
            if self.book.apply(run, self.book.rank(run, message.rank), message):
                self._pending.append((run.key, message))
        for run in self.book.runs.values():
            for rank in run.ranks.values():
                rank.status = rank.status or "unknown"

    def poll(self, timeout: float = 0.1) -> list[Keyed]:
        """Everything on the first call, nothing after."""
        self._polled = True
        out, self._pending = self._pending, []
        return out

    @property
    def catching_up(self) -> bool:
        """Never: everything comes in the first poll."""
        return False

    @property
    def done(self) -> bool:
        """After the first poll."""
        return self._polled

    def close(self) -> None:
        """Nothing to release."""
