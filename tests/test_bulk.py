"""Plain lines taken in bulk (a worker's read, a poll) end exactly where the general path ends."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmtop.tui import bulk, follow, readers
from lmtop.tui.follow import Follower
from lmtop.tui.runbook import RankState
from lmtop.tui.store import B1, Series, Store
from runs import T0, line

NAMES = ("loss", "grad_norm", "learning_rate")
# What a rank file may hold, besides the usual metrics line: each kind of line that is not
# plain (and so takes the general path), and the ways a plain run can end.
ODD = (
    "nan",  # a value written as its "nan" token
    "int",  # an integer value
    "int-metric",  # an integer metric besides the floats, from here on (tokens_seen)
    "big-int",  # an integer past 2**63: a float of its own in the store
    "bool",  # a boolean value: dropped from the message by the general path
    "event",
    "start",
    "end",
    "other-names",
    "reordered-names",
    "no-metrics",
    "step-back",
    "step-none",
    "time-back",
    "int-time",
    "seq-jump",
    "seq-wild",
    "seq-planted",  # a seq far ahead, and the next line goes on from before it
    "seq-repeat",
    "other-rank",
    "other-world",
    "extra-field",
    "version-2",
    "not-json",
    "blank",
    "list",
    "null",  # the JSON null: parsed, and no message
    "spaced",  # a plain line as another writer spaces it out (json.dumps' separators)
    "crlf",  # a plain line ending in a carriage return
    "cr-inside",  # a carriage return between two fields (JSON whitespace)
    "duplicate-key",  # a field twice: the last one counts
    "huge-int",  # an integer past 64 bits: orjson reads it as a float
    "huge-time",  # the same for the time
)


def _lines(kinds: list[str], rank: int = 0) -> bytes:
    """A rank file: mostly plain metrics lines, with the odd ones asked for."""
    out = []
    seq, step, t = -1, 0, T0
    ints = False  # every line from here on has an integer metric too
    for index, kind in enumerate(kinds):
        seq, step, t = seq + 1, step + (index % 3 != 0), t + 0.5
        metrics: dict[str, Any] = {name: 1.0 + index / (i + 1) for i, name in enumerate(NAMES)}
        if ints or kind == "int-metric":
            ints = True
            metrics["tokens_seen"] = 4096 * index
        fields: dict[str, Any] = {"m": metrics}
        message_kind, message_step, message_rank, world, version = "metrics", step, rank, 2, 1
        if kind == "nan":
            metrics["loss"] = float("nan")
        elif kind == "int":
            metrics["grad_norm"] = 7
        elif kind == "big-int":
            metrics["grad_norm"] = 2**63 + 12345
        elif kind == "bool":
            metrics["grad_norm"] = True
        elif kind == "event":
            message_kind, fields = "event", {"text": "evaluation"}
        elif kind == "start":
            message_kind, fields = "start", {"info": {"host": "box", "pid": 7}}
        elif kind == "end":
            message_kind, fields = "end", {"status": "finished", "dropped": 0}
        elif kind == "other-names":
            fields = {"m": {"eval_loss": 2.0 + index}}
        elif kind == "reordered-names":
            fields = {"m": dict(reversed(list(metrics.items())))}
        elif kind == "no-metrics":
            fields = {"m": {}}
        elif kind == "step-back":
            step = max(0, step - 5)
            message_step = step
        elif kind == "step-none":
            message_step = None
        elif kind == "time-back":
            t -= 3.0
        elif kind == "seq-jump":
            seq += 3
        elif kind == "seq-planted":
            out.append(line("r", rank, world, seq + 500, "metrics", step, t, **fields).strip())
            seq -= 1
            continue
        elif kind == "seq-wild":
            out.append(line("r", rank, world, seq + 10_000, "metrics", step, t, **fields).strip())
            continue
        elif kind == "seq-repeat":
            seq -= 1
        elif kind == "other-rank":
            message_rank = rank + 1
        elif kind == "other-world":
            world = 4
        elif kind == "extra-field":
            fields["note"] = {"a": [1, 2]}
        elif kind == "version-2":
            version = 2
        elif kind in ("not-json", "blank", "list", "null"):
            out.append(
                {"not-json": b"{nope", "blank": b"  ", "list": b"[1, 2]", "null": b"null"}[kind]
            )
            continue
        encoded = line("r", message_rank, world, seq, message_kind, message_step, t, **fields)
        encoded = encoded.strip()  # lines are joined below
        if kind == "int-time":
            encoded = encoded.replace(orjson.dumps(t), str(int(t)).encode())
        if version != 1:
            encoded = encoded.replace(b'"v":1', b'"v":2')
        if kind == "spaced":
            encoded = json.dumps(orjson.loads(encoded)).encode()
        elif kind == "crlf":
            encoded += b"\r"
        elif kind == "cr-inside":
            encoded = encoded.replace(b',"step"', b',\r"step"')
        elif kind == "duplicate-key":
            encoded = encoded.replace(b'"run":"r"', b'"run":"planted","run":"r"')
        elif kind == "huge-int":
            encoded = re.sub(rb'"loss":[^,}]+', b'"loss":18446744073709551617', encoded)
        elif kind == "huge-time":
            encoded = encoded.replace(orjson.dumps(t), b"18446744073709551617")
        out.append(encoded)
    return b"\n".join(out) + b"\n"


def _state(rank: RankState) -> dict[str, Any]:
    fields = {
        name: getattr(rank, name)
        for name in (
            "applied", "file_seq", "jump", "gaps", "bad_seq", "bad_lines", "messages", "points",
            "last_step", "last_t", "status", "started", "info", "problems", "ended",
        )
    }  # fmt: skip
    pace = rank.pace
    fields["pace"] = (pace.step, pace.t, list(pace.recent), pace.intervals.median())
    return fields


def _series(store: Store) -> dict[Any, Any]:
    """Every series' points and pyramid, bit for bit."""
    out: dict[Any, Any] = {"backwards": store.backwards, "last_step": store.last_step}
    for (_, rank, name), series in store.series.items():
        out[(rank, name)] = (
            series.steps.tobytes(),
            series.times.tobytes(),
            series.values.tobytes(),
            list(series.nonfinite),
            [level.tobytes() for level in (*series.b1, *series.b2)],
        )
    return out


@contextlib.contextmanager
def _line_by_line() -> Iterator[None]:
    """The follower's polls take every line by the general path (the reference)."""
    follow.PLAIN_RUNS = False
    try:
        yield
    finally:
        follow.PLAIN_RUNS = True


def _polled(run_dir: Path) -> tuple[list[tuple[Any, ...]], dict[str, Any], int]:
    """A follower polled to the end: each message it gave (every field), the rank's state."""
    follower = Follower([str(run_dir)], follow=False, live=False, lines=True)
    messages = []
    while not follower.done:
        for key, m in follower.poll(0):
            data = orjson.dumps(m.data)
            values = orjson.dumps(m.m)  # an int is not a float here (7 == 7.0)
            line = m.encode()  # as headless mode prints it, byte for byte
            messages.append(
                (key, m.run, m.rank, m.world, m.seq, m.t, m.kind, m.step, values, data, line)
            )
    (run,) = follower.runs.values()
    return messages, _state(run.ranks[0]), run.world


def _general(run_dir: Path) -> tuple[dict[str, Any], dict[Any, Any], int]:
    """The general path: a follower polled to the end line by line, into a store."""
    with _line_by_line():
        follower = Follower([str(run_dir)], follow=False, live=False)
        store = Store()
        while not follower.done:
            store.add(follower.poll(0))
    (run,) = follower.runs.values()
    return _state(run.ranks[0]), _series(store), run.world


def _bulk(run_dir: Path) -> tuple[dict[str, Any], dict[Any, Any], int]:
    """What a worker does: ``Follower.read_whole``, plain runs taken in bulk."""
    follower = Follower([str(run_dir)], follow=False, live=False)
    store = Store()
    run, rank, _ = follower.read_whole(run_dir, 0, store)
    return _state(rank), _series(store), run.world


# A rank file: mostly plain lines, with odd ones; whether a line half written ends it.
FILES = (
    st.lists(
        st.one_of(st.just("plain"), st.just("plain"), st.just("plain"), st.sampled_from(ODD)),
        max_size=120,
    ),
    st.booleans(),
)
EXAMPLES = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _write(tmp_path_factory: Any, kinds: list[str], torn: bool) -> Path:
    run_dir = tmp_path_factory.mktemp("bulk") / "r"
    run_dir.mkdir()
    text = _lines(kinds)
    if torn:  # a line half written at the end
        text += b'{"v":1,"run":"r","rank":0'
    (run_dir / "rank-0.jsonl").write_bytes(text)
    return run_dir


@given(*FILES)
@EXAMPLES
def test_a_bulk_read_ends_where_the_general_path_ends(
    tmp_path_factory: Any, kinds: list[str], torn: bool
) -> None:
    """Whatever a rank file holds, reading it in bulk leaves the rank's state (counters, gaps,
    bad lines, pace) and every series (points and pyramid, bit for bit) as reading it line by
    line does."""
    run_dir = _write(tmp_path_factory, kinds, torn)
    assert _bulk(run_dir) == _general(run_dir)


@given(*FILES)
@EXAMPLES
def test_a_poll_gives_the_messages_the_general_path_gives(
    tmp_path_factory: Any, kinds: list[str], torn: bool
) -> None:
    """The follower's polls (headless output, the alert engine, the app's live path) give
    each message with every field, in order, and leave the rank's state as reading the file
    line by line does, whatever the file holds."""
    run_dir = _write(tmp_path_factory, kinds, torn)
    bulk_polls = _polled(run_dir)
    with _line_by_line():
        assert bulk_polls == _polled(run_dir)


@contextlib.contextmanager
def _reads_of(size: int) -> Iterator[None]:
    """The follower reads each rank file ``size`` bytes at a time."""
    budget, least = follow.READ_BUDGET, follow.MIN_READ
    follow.READ_BUDGET = follow.MIN_READ = size
    try:
        yield
    finally:
        follow.READ_BUDGET, follow.MIN_READ = budget, least


@given(*FILES, st.integers(60, 4000))
@EXAMPLES
def test_what_a_finished_file_gives_does_not_depend_on_how_it_is_read(
    tmp_path_factory: Any, kinds: list[str], torn: bool, size: int
) -> None:
    """Read in one go or a few bytes at a time, a finished file gives the same messages and
    leaves the same state: a line whose seq jumps ahead is judged by the line after it even
    when a read ends between them (history workers and the parent read in other sizes). (What
    follows an end line is not read once the end is taken: it is left out here.)"""
    if "end" in kinds:
        kinds = kinds[: kinds.index("end") + 1]
    run_dir = _write(tmp_path_factory, kinds, torn)
    whole = _polled(run_dir)
    with _reads_of(size):
        assert _polled(run_dir) == whole


def test_a_planted_seq_is_judged_alike_wherever_a_read_ends(tmp_path: Path) -> None:
    """A line far ahead in seq that the next line does not follow, and a real gap (a relay
    writes one for the messages it lost), each at every place a read can end: the same
    messages and state as one read (the property test above finds this 1 time in 12)."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    kinds = ["plain"] * 3 + ["seq-planted"] + ["plain"] * 3 + ["seq-jump"] + ["plain"] * 3
    (run_dir / "rank-0.jsonl").write_bytes(_lines(kinds))
    whole = _polled(run_dir)
    assert [m[4] for m in whole[0]] == [0, 1, 2, 3, 4, 5, 9, 10, 11, 12]  # 503 is not the rank's
    assert (whole[1]["bad_seq"], whole[1]["gaps"]) == (1, 3)
    for size in range(100, 1200, 7):
        with _reads_of(size):
            assert _polled(run_dir) == whole, size


# What happens to a rank file while it is followed: lines appended (count), live frames of the
# next lines applied (the hook publishes, then writes: frames run ahead of the file; some are
# lost), and a read of what the file holds, in chunks of some bytes.
ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 30)),
        st.tuples(st.just("frames"), st.lists(st.booleans(), min_size=1, max_size=6)),
        st.tuples(st.just("read"), st.sampled_from([40, 300, 2000, 1 << 20])),
    ),
    max_size=25,
)


def _followed(
    run_dir: Path, lines: list[bytes], actions: list[tuple[Any, Any]]
) -> list[tuple[Any, ...]]:
    """Each action's messages and the rank's state after it (the pace's whole window, the
    reads planned, whether the rank was seen during it), then the rest of the file's."""
    path = run_dir / "rank-0.jsonl"
    path.write_bytes(b"")
    follower = Follower([str(run_dir)], follow=False, live=False, lines=True)
    follower.poll(0)
    (run,) = follower.runs.values()
    rank = run.ranks[0]
    written = framed = 0
    steps = []
    for action, arg in [*actions, ("append", len(lines)), ("read", 1 << 20)]:
        out: list[Any] = []
        before = time.monotonic()
        if action == "append":
            with path.open("ab") as file:
                file.write(b"".join(line + b"\n" for line in lines[written : written + arg]))
            written = min(len(lines), written + arg)
        elif action == "frames":
            for sent in arg:
                if framed < min(len(lines), written + 3):
                    if sent:
                        follower._apply_frame(run.key, 0, lines[framed], out)
                    framed += 1
        else:
            follower._limit = arg
            while follower._read(run, rank, out):
                pass
        messages = [
            (
                m.run,
                m.rank,
                m.world,
                m.seq,
                m.t,
                m.kind,
                m.step,
                orjson.dumps(m.m),
                orjson.dumps(m.data),
                m.encode(),
            )
            for _, m in out
        ]
        window = (list(rank.pace.intervals._order), rank.pace.stalled_at)
        planned = sorted(follower._idle)
        steps.append((messages, _state(rank), window, planned, rank.last_seen >= before))
    return steps


@given(*FILES, ACTIONS)
@EXAMPLES
def test_a_followed_file_gives_what_the_general_path_gives(
    tmp_path_factory: Any, kinds: list[str], torn: bool, actions: list[tuple[Any, Any]]
) -> None:
    """A file read as it grows, in chunks of any size, with live frames ahead of it or lost:
    each read gives the messages, and leaves the rank's state, as reading every line by the
    general path does."""
    run_dir = _write(tmp_path_factory, kinds, torn)
    lines = (run_dir / "rank-0.jsonl").read_bytes().split(b"\n")[:-1]
    bulk_reads = _followed(run_dir, lines, actions)
    with _line_by_line():
        assert bulk_reads == _followed(run_dir, lines, actions)


def test_a_plain_file_is_taken_in_bulk_and_its_pace_kept(tmp_path: Path) -> None:
    """Thousands of plain lines are taken as one run (so the test above compares the bulk
    path, not the general one twice), the pace keeps the last intervals, and the worker's
    payload holds every point."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    path = run_dir / "rank-0.jsonl"
    path.write_bytes(_lines(["plain"] * 3000))
    follower = Follower([str(run_dir)], follow=False, live=False)
    run = follower.book.run(str(run_dir), "r", run_dir)
    rank = follower.book.rank(run, 0)
    store = Store()
    lines = path.read_bytes().splitlines()
    plain = bulk.plain_run(run, rank, lines, bulk.parse(lines), 0)
    assert plain is not None and len(plain.docs) == 3000
    plain.to_store(run.key, 0, store)
    assert store.points == 3000 * len(NAMES) and rank.applied == 2999
    state, series, _ = _bulk(run_dir)
    assert (state, series) == _general(run_dir)[:2]
    assert len(state["pace"][2]) == 256
    # A poll takes the same plain lines in bulk, to the same messages and state.
    messages, polled_state, _ = _polled(run_dir)
    assert len(messages) == 3000 and polled_state == state
    payload = readers.read_rank(str(run_dir), 0)
    assert payload is not None and len(payload) > 3000 * len(NAMES) * 8


@given(
    st.integers(1024, 6000),
    st.lists(
        st.tuples(
            st.integers(0, 5999),
            st.sampled_from([math.nan, math.inf, -math.inf, 1.7e308, -1.7e308, 0.0, -0.0]),
        )
    ),
    st.integers(0, 70),
    st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_a_long_extend_summarises_its_blocks_as_point_by_point(
    count: int, odd: list[tuple[int, float]], before: int, dead_block: bool
) -> None:
    """A history's worth of points added at once (its full blocks summarised together) gives
    the pyramid, bit for bit, and the picture that adding them one at a time gives: NaN and
    infinities left out of every block's min, max, sum and count, a block of nothing but NaN
    included, the first of 0.0 and -0.0 kept, and finite points that sum past the float range
    (which math.fsum raised for, stopping the viewer's poll thread) summed to an infinity."""
    values = [math.sin(i * 0.37) * (1 + i % 7) for i in range(count)]
    for index, value in odd:
        if index < count:
            values[index] = value
    if dead_block:
        values[128:192] = [math.nan] * 64
    steps, times = list(range(count)), [T0 + i for i in range(count)]
    at_once, one_by_one = Series(), Series()
    at_once.extend(steps[:before], times[:before], values[:before])
    at_once.extend(steps[before:], times[before:], values[before:])
    for i in range(count):
        one_by_one.extend(steps[i : i + 1], times[i : i + 1], values[i : i + 1])
    for got, want in zip((*at_once.b1, *at_once.b2), (*one_by_one.b1, *one_by_one.b2)):
        assert got.tobytes() == want.tobytes()
    # Both against each block summarised from its points alone.
    blocks = -(-count // B1)
    alone = [Series._raw_summary(at_once, b * B1, min(count, b * B1 + B1)) for b in range(blocks)]
    assert [tuple(level[b] for level in at_once.b1) for b in range(blocks)] == alone
    for top in range(-(-blocks // B1)):
        part = alone[top * B1 : top * B1 + B1]
        want2 = (min(p[0] for p in part), max(p[1] for p in part), sum(p[2] for p in part))
        # repr: blocks summed to +inf and -inf make a NaN above them, and NaN != NaN
        assert repr(tuple(level[top] for level in at_once.b2[:3])) == repr(want2)
    assert at_once.nonfinite == one_by_one.nonfinite
    for ncols in (7, 80):
        assert repr(at_once.columns(0, count, ncols)) == repr(one_by_one.columns(0, count, ncols))


def test_a_file_whose_lines_hold_an_integer_reads_as_fast_as_line_by_line(
    tmp_path: Path,
) -> None:
    """Lines that are plain but for one value (a metric logged as an int, a NaN on every line
    of a diverged run) take the general path one by one: the bulk read must not look at the
    rest of the chunk again for each (it took 36 s for 8,000 such lines, 0.06 s line by line).
    A ratio measured in one run, with a wide margin: timing on a shared machine varies."""
    import time

    warm = tmp_path / "warm"  # first calls' costs (imports, numpy) out of the timing
    warm.mkdir()
    (warm / "rank-0.jsonl").write_bytes(_lines(["plain"] * 100 + ["int"] * 100))
    _bulk(warm), _general(warm)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    text = _lines(["plain"] * 500 + ["int"] * 4000 + ["nan"] * 2000 + ["plain"] * 500)
    (run_dir / "rank-0.jsonl").write_bytes(text)
    started = time.process_time()
    bulk_read = _bulk(run_dir)
    bulk_seconds = time.process_time() - started
    started = time.process_time()
    general = _general(run_dir)
    general_seconds = time.process_time() - started
    assert bulk_read == general
    # ~1.5x here; scanning the rest of the chunk per line was ~400x (24 s against 0.06 s).
    assert bulk_seconds < 10 * general_seconds + 0.5


def test_a_long_extend_keeps_the_first_of_two_zeros_as_one_block_alone_does() -> None:
    """Blocks whose min or max is a zero: 0.0 then -0.0 (and -0.0 then 0.0) give the same bits
    whether summarised together or one point at a time (numpy picked either zero)."""
    values = [1.0] * 2048
    values[5], values[9] = 0.0, -0.0
    values[70], values[75] = -0.0, 0.0
    values[130], values[140] = -0.0, -1.0  # a zero as the max
    values[200], values[210] = 0.0, -0.0
    values[200:264] = [-v if v else v for v in values[200:264]]
    steps, times = list(range(2048)), [T0 + i for i in range(2048)]
    at_once, one_by_one = Series(), Series()
    at_once.extend(steps, times, values)
    for i in range(2048):
        one_by_one.extend(steps[i : i + 1], times[i : i + 1], values[i : i + 1])
    for got, want in zip(at_once.b1, one_by_one.b1):
        assert got.tobytes() == want.tobytes()


def test_headless_prints_the_hook_s_lines_as_read_and_every_line_as_re_encoded(
    tmp_path: Path,
) -> None:
    """``lmtop --headless`` prints a plain line of the hook's as read, not encoded again, and
    what it prints is byte for byte what re-encoding each message gives, whatever another
    writer put in the file: spacing, a carriage return, a field twice, an integer past 64
    bits (the polls' property tests above check the same for every odd line)."""
    from lmtop.tui import headless
    from lmtop.tui.alert_settings import AlertSettings

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    odd = ["spaced", "crlf", "cr-inside", "duplicate-key", "huge-int", "huge-time"]
    kinds = ["plain"] * 40 + [kind for kind in odd for _ in range(3)] + ["plain"] * 9
    text = _lines(["start", *["plain"] * 50, "end"])  # the hook's lines alone
    (run_dir / "rank-0.jsonl").write_bytes(text)
    (run_dir / "rank-1.jsonl").write_bytes(_lines(["start", *kinds, "end"], rank=1))

    def printed() -> bytes:
        out = io.BytesIO()
        quiet = AlertSettings(enabled=False)
        assert headless.run([str(run_dir)], follow=False, out=out, settings=quiet) == 0
        return out.getvalue()

    in_bulk = printed()
    with _line_by_line():
        assert in_bulk == printed()
    assert in_bulk.count(b"\n") == 52 + len(kinds) + 2 and b"\r" not in in_bulk
    # The hook's lines were taken as read: the polls' messages carry them.
    follower = Follower([str(run_dir)], follow=False, live=False, lines=True)
    read_as_is = [m.line for _, m in follower.poll(0) if m.line is not None]
    assert sorted(read_as_is) == sorted(text.split(b"\n")[1:51])
    # Others (the app) do not pay for the look: they print nothing.
    quiet = Follower([str(run_dir)], follow=False, live=False)
    assert all(m.line is None for _, m in quiet.poll(0))
