"""The cyclic garbage collector, set for a viewer that makes millions of short-lived objects.

Reading a history makes ~3 tracked objects a line (the parsed message, its ``Message``, the
batch's pair) that live until the line is printed, charted or judged. With CPython's default
thresholds (700, 10, 10) the collector ran 31 full collections over the 8 × 100k history of
``benchmarks/history.py``, each walking every object alive, start-up's included: headless mode
took 5.0-5.4 s with them and 3.9-4.0 s with the settings below (one sitting, three runs each).
Hardly anything the viewer makes is a cycle, so the youngest generation is let grow to
:data:`YOUNG` allocations before a collection (most objects are gone by then) and what exists
once its imports are done (modules, classes, functions) is frozen out of the collector's
walks. Cycles are still collected, later: up to YOUNG allocations' worth of garbage waits for
a collection (300,000 dropped 1 KB cycles: 60 MB at most, tests/test_history.py).
"""

from __future__ import annotations

import gc

YOUNG = 50_000  # allocations between collections of the youngest generation (CPython's: 700)


def settle() -> None:
    """Freezes what exists now out of the collector's walks and makes collections rarer; for a
    process that has imported what it runs (the viewer, a worker)."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG, middle, old)
