"""Protocol messages for runs nobody instrumented (a Trainer's state file, TensorBoard events).

Built as a hooked rank's lines are, encoded and decoded by :mod:`lmtop.hooks.schema`, so they
pass the same checks (a value the schema cannot carry is dropped as it would be there) and
everything downstream treats them alike. Such a run is one rank: 0 of a world of 1.
"""

from __future__ import annotations

from typing import Any

from lmtop.hooks import schema


def message(
    run: str, seq: int, kind: str, step: int | None, t: float, **fields: Any
) -> schema.Message:
    """Rank 0's message number ``seq`` of ``run``; ``m`` (metrics) may hold NaN and Inf."""
    data = {
        "v": schema.PROTOCOL_VERSION,
        "run": run,
        "rank": 0,
        "world": 1,
        "seq": seq,
        "t": float(t),
        "kind": kind,
        "step": step,
        **fields,
    }
    if "m" in data:
        data["m"] = {k: schema.finite_or_token(float(v)) for k, v in data["m"].items()}
    return schema.decode(schema.encode(data))
