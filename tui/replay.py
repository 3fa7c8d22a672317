"""Alerts over a long history, computed after its first frame by reading the run files again.

The alert engine costs several microseconds a message: over an 8-rank history of 100,000 steps
that is most of the time before the charts could show. So while a history is being read, its
messages go to the store and the screen only; once it is read to its end and painted, the run
files (the truth) are read a second time, from the start, by a separate reader that stops at
where the follower stood, and that replay feeds the engine one bounded batch at a time. Nothing
of the history is held meanwhile.

Exactly once, per rank: the engine has seen every message up to ``floor`` (fed as they came,
before the history began), the replay feeds those after ``floor`` up to ``cut`` (where the
follower stood once the history was read), and the messages the follower applies after
``cut`` (live ones, arriving during the replay) are held and fed once the replay is done, so
each rank's messages reach the engine once each, in order. A run whose messages cannot be read
again (no directory: an old hook's live-only run) is fed as it comes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .follow import Keyed

if TYPE_CHECKING:
    from .follow import Follower

# Messages applied during a replay are held for the engine up to this many (16 ranks live for
# a minute); beyond, they are left to another replay.
HELD_MESSAGES = 40_000
# A backlog smaller than this (~20,000 messages, ~0.1 s of the engine) is fed as it is read: a
# viewer that fell behind for a moment (a burst, a terminal stopped with ctrl-z) must not read
# every run file again from the start for it. A history begins above it.
REPLAY_FROM_BYTES = 8 << 20
Position = dict[tuple[str, int], int]  # (run key, rank) -> seq of the last message applied
Feed = Callable[[list[Keyed]], list[Any]]  # the engine's feed_batch, told alerts as (index, alert)


class Replay:
    """The messages a follower applied with ``floor < seq <= cut``, read again from the files."""

    def __init__(self, reader: Follower, floor: Position, cut: Position) -> None:
        self._reader = reader
        self._floor = floor
        self._cut = cut

    def poll(self) -> list[Keyed]:
        """The next batch (at most one poll's read budget of run files)."""
        floor, cut = self._floor, self._cut
        return [
            (key, message)
            for key, message in self._reader.poll(0)
            if floor.get((key, message.rank), -1) < message.seq <= cut.get((key, message.rank), -1)
        ]

    @property
    def done(self) -> bool:
        """Whether every rank was read up to its cut (or its file holds nothing more)."""
        if self._reader.done:
            return True
        runs = self._reader.runs
        for (key, rank), seq in self._cut.items():
            state = runs[key].ranks.get(rank) if key in runs else None
            if state is None or state.applied < seq:
                return False
        return True

    def close(self) -> None:
        """Releases the reader."""
        self._reader.close()


class HistoryAlerts:
    """Feeds the engine each message once: as it comes, or, for a history, from a replay.

    The caller polls the follower and hands each batch to :meth:`take`; when :attr:`owed` says
    a history was read to its end, it paints the history, calls :meth:`start`, and then
    :meth:`step` on each turn of its loop until :attr:`replaying` is False.
    """

    def __init__(self, feed: Feed, follower: Follower) -> None:
        self._feed = feed
        self._follower = follower
        self._floor: Position | None = None  # set while a history is read: its alerts are owed
        self._replay: Replay | None = None
        self._held: list[Keyed] = []  # applied after the cut, while the replay runs
        self._fed: Position = {}  # the last seq fed, per rank
        self._again = False  # another replay is owed after this one

    @property
    def owed(self) -> bool:
        """A history was read to its end and its alerts are owed: paint, then :meth:`start`."""
        return self._floor is not None and not self._follower.catching_up

    @property
    def replaying(self) -> bool:
        """Whether alerts over a history are still owed (being read again, or about to be)."""
        return self._floor is not None or self._replay is not None

    @property
    def reading_again(self) -> bool:
        """Whether the run files are being read again for the engine (a replay under way)."""
        return self._replay is not None

    def take(self, batch: list[Keyed], restored: bool = False) -> list[Any]:
        """The alerts of the messages of ``batch`` that are not left to a replay; ``restored``:
        ranks were taken from their cache before it (a history the engine has not seen)."""
        replayable = self._follower.replayable
        if self._replay is not None:  # after the cut: fed once the replay is done
            # Another history taken meanwhile, or more held than HELD_MESSAGES: a replay after
            # this one, from what the engine has seen, covers it and what was held (dropped).
            self._again = self._again or restored or len(self._held) > HELD_MESSAGES
            if self._again:
                self._held = []
            else:
                self._held += [pair for pair in batch if replayable(pair[0])]
            return self._fed_now([pair for pair in batch if not replayable(pair[0])])
        if self._floor is None and restored:
            self._floor = dict(self._fed)
        if self._floor is None:
            told = self._fed_now(batch)
            follower = self._follower
            if follower.catching_up and follower.unread_bytes() >= REPLAY_FROM_BYTES:
                self._floor = dict(self._fed)  # a long history begins: fed by a replay, later
            return told
        # A history is being read: what cannot be read again is fed now, the rest later.
        return self._fed_now([pair for pair in batch if not replayable(pair[0])])

    def _fed_now(self, batch: list[Keyed]) -> list[Any]:
        if not batch:
            return []
        fed = self._fed
        for key, message in batch:
            fed[(key, message.rank)] = message.seq
        return self._feed(batch)

    def start(self) -> None:
        """Starts reading the history again, up to where the follower stands now."""
        assert self._floor is not None
        self._replay = self._follower.replay(self._floor, self._follower.positions())
        self._floor = None

    def step(self) -> list[Any]:
        """Alerts of the next batch of the replay; once it is done, of the messages held."""
        replay = self._replay
        if replay is None:
            return []
        told = self._fed_now(replay.poll())
        if replay.done:
            replay.close()
            self._replay = None
            held, self._held = self._held, []
            if self._again:  # the held messages are read again with the new history
                self._again, self._floor = False, dict(self._fed)
            else:
                told += self._fed_now(held)
        return told

    def close(self) -> None:
        """Releases a replay under way."""
        if self._replay is not None:
            self._replay.close()
            self._replay = None
