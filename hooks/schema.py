"""The lmtop wire schema, protocol v1: the one description of a message, on the wire and on disk.

Every message is one JSON object on one line (RFC 8259, readable by ``jq`` and ``json.loads``)::

    {"v": 1, "run": "train-20261124-193512-1a2b", "rank": 0, "world": 8, "seq": 42,
     "t": 1795000000.25, "kind": "metrics", "step": 1200, "m": {"loss": 2.31, "lr": 0.0001}}

``seq`` counts from 0 per rank and reveals every drop. Kinds and their extra fields:

- ``start``: ``info`` — host, pid, argv, world, rank, config, lmtop and protocol versions.
- ``metrics``: ``m`` — metric name to number.

``step`` (null or an integer) and ``seq`` lie in [0, 2**63).
- ``event``: ``text`` — free text (checkpoint saved, evaluation done, ...), optional ``data``.
- ``end``: ``status`` — ``"ok"`` or ``"error"``, optional ``error`` (the exception's summary).

JSON has no NaN or infinity, so a non-finite metric value travels as one of the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"``; :func:`decode` turns them back into floats.
Unknown fields are ignored; an unknown major version is refused with :class:`UnsupportedVersion`.

The training side (``lmtop.hooks``) and the viewing side (``lmtop.tui``) both import this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

PROTOCOL_VERSION: Final = 1

START: Final = "start"
METRICS: Final = "metrics"
EVENT: Final = "event"
END: Final = "end"
KINDS: Final = frozenset({START, METRICS, EVENT, END})

MAX_MESSAGE_BYTES: Final = 64 * 1024
MAX_NAME_CHARS: Final = 200
MAX_METRICS: Final = 1000
MAX_RANK: Final = 1 << 20
# Containers nested deeper than this are refused: the JSON parser reads up to 1024 levels but
# the encoder writes 254 at most, and a viewer re-encodes what it keeps (snapshots, exports).
MAX_DEPTH: Final = 64
# Steps and seqs are signed 64-bit integers from 0: the viewer keeps them in array("q").
MAX_STEP: Final = (1 << 63) - 1

# A run directory holds one file per rank: this name, and nothing else, is a rank file.
RANK_FILE: Final = re.compile(r"^rank-(\d{1,7})\.jsonl$")


def rank_file(rank: int) -> str:
    """The file name of one rank's messages in its run directory."""
    return f"rank-{rank}.jsonl"


NAN: Final = "NaN"
POS_INF: Final = "Infinity"
NEG_INF: Final = "-Infinity"
_NON_FINITE: Final = {NAN: math.nan, POS_INF: math.inf, NEG_INF: -math.inf}

_INT_MIN: Final = -(1 << 63)
_INT_MAX: Final = (1 << 64) - 1


class BadMessage(ValueError):
    """A line or frame that is not a protocol message; the viewer skips it and counts it."""


class UnsupportedVersion(BadMessage):
    """A message of a protocol major version this lmtop does not speak."""


def finite_or_token(value: float) -> float | str:
    """Returns a float unchanged when finite, else its string token (``"NaN"``, ...)."""
    if value - value == 0.0:
        return value
    if value != value:
        return NAN
    return POS_INF if value > 0 else NEG_INF


def number(value: Any) -> int | float | str | None:
    """Converts a Python, numpy or 0-d tensor value to what a metric holds on the wire.

    Returns None when the value is not a number (a string, None, a list, ...). Does not import
    numpy or torch: anything with a scalar ``item()`` is asked for it.
    """
    kind = type(value)
    if kind is float:
        return finite_or_token(value)
    if kind is int:
        return value if _INT_MIN <= value <= _INT_MAX else finite_or_token(float(value))
    if kind is bool:
        return int(value)
    if isinstance(value, (str, bytes, bytearray)) or value is None:
        return None
    if isinstance(value, bool):  # a bool subclass
        return int(value)
    if isinstance(value, int):
        return number(int(value))
    if isinstance(value, float):
        return finite_or_token(float(value))
    item = getattr(value, "item", None)
    if item is None or not callable(item):
        return None
    size = getattr(value, "size", 1)
    if not isinstance(size, int):  # torch: size is a method
        numel = getattr(value, "numel", None)
        size = numel() if callable(numel) else 1
    if size != 1:
        return None
    scalar = item()
    if type(scalar) in (float, int, bool):
        return number(scalar)
    return None


def encode(message: dict[str, Any]) -> bytes:
    """Encodes one message as a JSON line (with its trailing newline)."""
    return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)


@dataclass(slots=True)
class Message:
    """One decoded message. ``data`` holds every field, validated, as it would be re-encoded."""

    run: str
    rank: int
    world: int
    seq: int
    t: float
    kind: str
    step: int | None
    m: dict[str, float]
    data: dict[str, Any] = field(repr=False)
    # The line it was read from, without its newline, where that line stands for ``data``
    # (a rank file's plain metrics line, see lmtop.tui.bulk.PlainRun): encode() gives it.
    line: bytes | None = field(default=None, repr=False, compare=False)

    def encode(self) -> bytes:
        """The message as a JSON line, non-finite values as their string tokens: the line it
        was read from when there is one (the hook's lines are what encoding gives, byte for
        byte), else ``data`` encoded."""
        line = self.line
        return line + b"\n" if line is not None else encode(self.data)


def _metric_value(value: Any) -> float | None:
    kind = type(value)
    if kind is float or kind is int:
        return value
    if kind is str:
        return _NON_FINITE.get(value)
    return None


def _shallow(value: dict[str, Any] | list[Any]) -> bool:
    """Whether ``value`` nests at most MAX_DEPTH containers deep (so it can be re-encoded)."""
    level: list[Any] = [value]
    for _ in range(MAX_DEPTH):
        inner = []
        for item in level:
            for child in item.values() if type(item) is dict else item:
                if type(child) in (dict, list):
                    inner.append(child)
        if not inner:
            return True
        level = inner
    return False


def decode(line: bytes | str) -> Message:
    """Decodes and validates one message.

    Raises:
        UnsupportedVersion: the message is of another protocol major version.
        BadMessage: anything else that is not a v1 message. Single metrics that are not numbers
            are dropped from ``m`` rather than failing the message.
    """
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"not JSON: {exc}") from None
    return validate(data)


def validate(data: Any) -> Message:
    """Validates one message already parsed from JSON (see :func:`decode`); ``data`` becomes
    the message's ``data`` and may be changed (an integer ``t`` made a float, say)."""
    if type(data) is not dict:
        raise BadMessage("not a JSON object")
    version = data.get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        if type(version) is int:
            raise UnsupportedVersion(
                f"protocol v{version} is not supported by this lmtop (it speaks v{PROTOCOL_VERSION})"
            )
        raise BadMessage("missing or invalid protocol version 'v'")
    get = data.get
    run, rank, world, seq = get("run"), get("rank"), get("world"), get("seq")
    t, kind, step = get("t"), get("kind"), get("step")
    if type(run) is not str or not run or len(run) > MAX_NAME_CHARS:
        raise BadMessage("invalid 'run'")
    if type(rank) is not int or not 0 <= rank < MAX_RANK:
        raise BadMessage("invalid 'rank'")
    if type(world) is not int or not 1 <= world <= MAX_RANK:
        raise BadMessage("invalid 'world'")
    if type(seq) is not int or not 0 <= seq <= MAX_STEP:
        raise BadMessage("invalid 'seq'")
    if type(t) is not float or t - t != 0.0:
        if type(t) is int:
            t = data["t"] = float(t)
        else:
            raise BadMessage("invalid 't'")
    if kind not in KINDS:
        raise BadMessage(f"unknown kind {str(kind)[:40]!r}")
    if kind != METRICS or len(data) > 7 + ("step" in data) + ("m" in data):  # other fields
        for key, value in data.items():
            if key != "m" and type(value) in (dict, list) and not _shallow(value):
                raise BadMessage(f"{str(key)[:40]!r} nested deeper than {MAX_DEPTH} levels")
    if step is not None and (type(step) is not int or not 0 <= step <= MAX_STEP):
        raise BadMessage("invalid 'step'")
    metrics: dict[str, float] = {}
    raw = get("m")
    if raw is not None:
        if type(raw) is not dict:
            raise BadMessage("invalid 'm'")
        if all(type(v) is float for v in raw.values()) and (
            not raw or max(map(len, raw)) <= MAX_NAME_CHARS
        ):
            metrics = raw  # the common case, all finite floats: nothing to convert or drop
        else:
            for name, value in raw.items():
                number_ = _metric_value(value)
                if number_ is not None and len(name) <= MAX_NAME_CHARS:
                    metrics[name] = number_
            if len(metrics) != len(raw):
                data["m"] = {name: finite_or_token(v) for name, v in metrics.items()}
    return Message(run, rank, world, seq, t, kind, step, metrics, data)
