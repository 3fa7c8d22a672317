"""Making text from the wire inert: names of runs, metrics and events are shown, never executed."""

from __future__ import annotations

import re

# C0 and C1 control characters and DEL: escape sequences, bells, carriage returns, ...
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def inert(text: object, limit: int = 200) -> str:
    """``text`` with every control character written out (``\\x1b``), cut to ``limit`` chars.

    Rich markup needs no escaping here as long as the result is shown as a ``rich.text.Text``
    (never as a markup string): the app does that everywhere.
    """
    value = str(text)
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
