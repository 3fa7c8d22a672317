"""The cyclic garbage collector, set for a viewer that reads millions of lines of history.

Reading a history makes ~3 tracked objects a line (the parsed message, its ``Message``, the
batch's pair) that live until the line is printed, charted or judged. With CPython's default
thresholds (700, 10, 10) the collector ran 31 full collections over the 8 × 100k history of
``benchmarks/history.py``, each walking every object alive, start-up's included: headless mode
took 5.0-5.4 s with them and 3.9-4.0 s with rare collections (one sitting, three runs each).
Hardly anything a read makes is a cycle, so while a history is read (:func:`reading`) the
youngest generation is let grow to :data:`YOUNG` allocations before a collection (most objects
are gone by then); what exists once the imports are done (modules, classes, functions) is
frozen out of the collector's walks for good (:func:`settle`). Following live runs, the
collector is as CPython sets it: the app following 16 live ranks with rare collections grew
5.7 MB a minute against 4.7 with the defaults (ten minutes, side by side), which over days of
following is not to be had for a few percent of a core.
"""

from __future__ import annotations

import gc

YOUNG = 50_000  # allocations between collections of the youngest generation while reading
_USUAL = gc.get_threshold()[0]  # the process's own (CPython's 700) for the rest of the time


def settle() -> None:
    """Freezes what exists now out of the collector's walks, and collects rarely until told
    that no history is being read (:func:`reading`); for a process that has imported what it
    runs (the viewer, a worker)."""
    gc.freeze()
    reading(True)


def reading(history: bool) -> None:
    """Collections rare while a history is read (``history``), as usual otherwise. Cheap to
    call at every poll: the threshold is set only when it changes."""
    young = YOUNG if history else _USUAL
    current = gc.get_threshold()
    if current[0] != young:
        gc.set_threshold(young, *current[1:])
