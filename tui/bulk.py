"""Reading rank files in bulk: runs of the usual lines checked and applied all at once.

A worker reading a long history (``readers.py``) spent ~16 µs a line on the general path: each
line decoded and validated into a ``Message``, applied to the run book (its pace updated at
every step), then grouped into the store. Yet almost every line of a rank file has one shape:
a metrics message of the rank, with the next ``seq``, the names of the line before, finite
float values and a step that does not go back. For a run of such lines, what the general path
does is known in advance: the run book's counters move by the run's length, the pace keeps
only its last intervals, and the store takes the values as columns. So each line is parsed by
orjson, the runs of plain lines are taken here, and every other line goes through the general
path as before. A worker puts a plain run's values into the store as columns
(:meth:`PlainRun.to_store`); the follower's polls, which read files for the headless output,
the alert engine and a replay, make its messages straight from the parsed lines
(:meth:`PlainRun.messages`: 8.3 -> 5.4 µs a line). The outcome is the general path's, field
for field: ``tests/test_bulk.py`` compares the two on generated files with every kind of odd
line.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple

import orjson
from lmtop.hooks import schema

from .runbook import RankState, Run
from .store import Store

# The fields of a metrics message as the hook writes them; a line with any other field (or
# fewer) is not plain and takes the general path.
_FIELDS = 9
# orjson reads an integer past 64 bits as a float: from this magnitude on a float may be one.
_INT_BOUND = 2.0**63
_M = itemgetter("m")  # a metrics line's values


def parse(lines: list[bytes]) -> list[Any]:
    """Each line's JSON value, or None where a line is not JSON (the general path counts it)."""
    loads = orjson.loads
    try:
        return [loads(line) for line in lines]
    except orjson.JSONDecodeError:
        docs: list[Any] = []
        for line in lines:
            try:
                docs.append(loads(line))
            except orjson.JSONDecodeError:
                docs.append(None)
        return docs


def plain_run(
    run: Run, rank: RankState, lines: list[bytes], docs: list[Any], start: int
) -> PlainRun | None:
    """Applies the plain metrics lines from ``docs[start]`` (``lines``, parsed) on to the run
    book, as the general path would; returns them (None when ``docs[start]`` is not plain)."""
    first = docs[start]
    pace = rank.pace
    if (
        not _ready(rank)
        or rank.file_seq + len(docs) >= schema.MAX_STEP
        or type(first) is not dict
        or len(first) != _FIELDS
        or first.get("kind") != schema.METRICS
    ):
        return None
    metrics, run_name, world = first.get("m"), first.get("run"), first.get("world")
    if (
        type(metrics) is not dict
        or not metrics
        or max(map(len, metrics)) > schema.MAX_NAME_CHARS
        or type(run_name) is not str
        or not run_name
        or len(run_name) > schema.MAX_NAME_CHARS
        or type(world) is not int
        or not 1 <= world <= schema.MAX_RANK
    ):
        return None
    names = tuple(metrics)
    kinds = tuple(map(type, metrics.values()))  # every line of a run: the same (see _numbers)
    if not _numbers(kinds):
        return None
    number, seq = rank.rank, rank.file_seq + 1
    last_step = pace.step if pace.step is not None else 0
    steps: list[int] = []
    times: list[float] = []
    end = start
    for index in range(start, len(docs)):  # not docs[start:]: a copy of the rest, each run
        doc = docs[index]
        try:
            if not (type(doc) is dict and len(doc) == _FIELDS):
                break
            version, step, t, values = doc["v"], doc["step"], doc["t"], doc["m"]
            if not (
                doc["seq"] == seq
                and doc["kind"] == schema.METRICS
                and doc["run"] == run_name
                and doc["rank"] == number
                and doc["world"] == world
                and version == schema.PROTOCOL_VERSION
                and type(version) is int
                and type(doc["seq"]) is int
                and type(doc["rank"]) is int
                and type(doc["world"]) is int
                and type(step) is int
                and last_step <= step <= schema.MAX_STEP
                and type(t) is float
                and t - t == 0.0
                and type(values) is dict
                and tuple(values) == names
            ):
                break
        except KeyError:
            break
        if tuple(map(type, values.values())) != kinds:  # a "nan" token, an int now: it ends
            break
        steps.append(step)
        times.append(t)
        last_step = step
        seq += 1
        end += 1
    if end == start:
        return None
    _apply(run, rank, steps, times, world)
    return PlainRun(lines[start:end], docs[start:end], run_name, world, names, steps, times)


class PlainRun(NamedTuple):
    """Plain metrics lines of one rank, applied to the run book: the lines, each one's JSON
    object, and what they share (run name, world, metric names, in that order) or hold (steps,
    times)."""

    lines: list[bytes]
    docs: list[dict[str, Any]]
    run_name: str
    world: int
    names: tuple[str, ...]
    steps: list[int]
    times: list[float]

    def messages(self, rank: int, keep_lines: bool = False) -> list[schema.Message]:
        """The messages ``schema.decode`` makes of these lines (each its own JSON object). A
        message's ``m`` is its ``data["m"]``, as decode's for float values (for integers it
        copies ``m``): nothing changes either after decoding. With ``keep_lines``, where the
        lines can stand for them (:meth:`as_encoded`), each message keeps its line, which
        ``Message.encode`` gives as it is: headless mode prints 800k lines ~1 s faster so."""
        message, run, world, metrics = schema.Message, self.run_name, self.world, schema.METRICS
        kept = keep_lines and self.as_encoded()
        lines = self.lines if kept else [None] * len(self.docs)
        return [
            message(run, rank, world, doc["seq"], doc["t"], metrics, doc["step"], doc["m"], doc, line)
            for line, doc in zip(lines, self.docs)
        ]  # fmt: skip

    def as_encoded(self) -> bool:
        """Whether the lines can stand for their messages as they are, looked at once for all
        (0.8 µs a line, against 2.7 to encode one). The hook's lines are byte for byte what
        encoding gives; another writer's are kept only without whitespace (spacing, a carriage
        return that a terminal would act on), with one colon a field (a field twice, which
        parsers read alike but ``grep`` does not, or a colon in a name, makes more: without
        whitespace each field has its own) and without an integer orjson read as a float for
        being past 64 bits (no value that large). Its spelling of the same numbers and strings
        (``1E5``, ``\\u0072``) is kept."""
        joined = b"\n".join(self.lines)
        if b" " in joined or b"\t" in joined or b"\r" in joined:
            return False
        if joined.count(b":") != len(self.lines) * (_FIELDS + len(self.names)):
            return False
        values = list(chain.from_iterable(map(dict.values, [doc["m"] for doc in self.docs])))
        values += (min(self.times), max(self.times))
        return min(values) > -_INT_BOUND and max(values) < _INT_BOUND

    def to_store(self, key: str, rank: int, store: Store) -> None:
        """Adds the lines' values to ``store`` as columns."""
        import numpy as np  # here: the follower's poll (headless mode) takes no columns

        # The values in file order, row after row, straight into one matrix (no tuple a row:
        # 0.49 against 1.02 µs a line), then a column at a time; an integer becomes the float
        # ``np.array`` would make of it.
        values = chain.from_iterable(map(dict.values, map(_M, self.docs)))
        count = len(self.docs) * len(self.names)
        matrix = np.fromiter(values, np.float64, count).reshape(len(self.docs), len(self.names))
        columns = [array("d", matrix[:, column].tobytes()) for column in range(len(self.names))]
        store.add_columns(
            key, rank, self.names, array("q", self.steps), array("d", self.times), columns
        )


def _apply(run: Run, rank: RankState, steps: list[int], times: list[float], world: int) -> None:
    """What ``RunBook.apply`` does for each of these messages (contiguous seqs, steps that do
    not go back, no pace step above the first), done once for all of them."""
    count = len(steps)
    rank.applied = rank.file_seq = rank.file_seq + count
    rank.messages += count
    rank.points += count
    rank.last_t = times[-1]
    rank.last_seen = time.monotonic()
    rank.last_step = steps[-1]
    run.world = max(run.world, world)
    pace = rank.pace
    # The pace keeps its last 256 intervals (and a median of the last 20): only the intervals
    # that can still be among them are added, found from the end.
    wanted = max(pace.recent.maxlen or 0, pace.window)
    tail: list[tuple[int, float]] = []
    for index in range(count - 1, -1, -1):
        if len(tail) == wanted:
            break
        if index:
            before_step, before_t = steps[index - 1], times[index - 1]
        elif pace.step is not None and pace.t is not None:
            before_step, before_t = pace.step, pace.t
        else:
            break
        step, t = steps[index], times[index]
        if step > before_step and t >= before_t:
            tail.append((step, (t - before_t) / (step - before_step)))
    for step, seconds in reversed(tail):
        pace.intervals.add(seconds)
        pace.recent.append((step, seconds))
    pace.step, pace.t = steps[-1], times[-1]


def read_chunk(
    run: Run,
    rank: RankState,
    lines: list[bytes],
    decode: Callable[[list[bytes], list[Any]], list[schema.Message]],
    take: Callable[[list[schema.Message]], None],
    take_run: Callable[[PlainRun], None],
) -> None:
    """Applies one chunk of a rank file's lines in file order: plain runs here, each then
    handed to ``take_run``, the rest by ``take`` (the follower's general path, given the
    messages ``decode`` makes of lines and their parsed JSON values)."""
    docs = parse(lines)
    index, count = 0, len(lines)
    while index < count:
        ready = _ready(rank)
        plain = (
            plain_run(run, rank, lines, docs, index) if ready and _may_start(docs, index) else None
        )
        if plain is not None:
            take_run(plain)
            index += len(plain.docs)
            continue
        # The lines up to the next that may start a plain run go to the general path together:
        # all of them while the rank takes none (live frames ahead of its file, say).
        stop = index + 1 if ready else count
        while stop < count and not _may_start(docs, stop):
            stop += 1
        messages = decode(lines[index:stop], docs[index:stop])
        expected = rank.file_seq + 1
        if any(message.seq != expected + k for k, message in enumerate(messages)):
            # Out of sequence: whether a line is the rank's depends on the lines after it,
            # which the general path reads together (``Follower._take``).
            take(messages + decode(lines[stop:], docs[stop:]))
            break
        take(messages)
        index = stop


def _ready(rank: RankState) -> bool:
    """Whether the rank takes plain runs now: not done, no seq jump to confirm or to judge (a
    line held from the read before), its file's messages not behind what was applied from live
    frames."""
    return (
        not rank.done
        and 0 <= rank.rank < schema.MAX_RANK
        and rank.jump is None
        and rank.held is None
        and rank.applied == rank.file_seq
    )


def _may_start(docs: list[Any], index: int) -> bool:
    """Whether a plain run may start at ``docs[index]`` (a cheap look: plain_run decides): a
    metrics line of numbers, followed by one with the same names. A run of one line costs
    more in bulk than on the general path (a file whose lines alternate two sets of names)."""
    doc = docs[index]
    if type(doc) is not dict or len(doc) != _FIELDS or doc.get("kind") != schema.METRICS:
        return False
    values = doc.get("m")
    after = docs[index + 1] if index + 1 < len(docs) else None
    return (
        type(values) is dict
        and type(after) is dict
        and type(after.get("m")) is dict
        and after["m"].keys() == values.keys()
        and _numbers(tuple(map(type, values.values())))
    )


def _numbers(kinds: tuple[type, ...]) -> bool:
    """Whether values of these types are all numbers a metric keeps as they are: floats and
    integers (the hook writes an integer metric, ``tokens_seen``, as one), not booleans."""
    return _NUMBERS.issuperset(kinds)


_NUMBERS = frozenset((float, int))
