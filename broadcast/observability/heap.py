"""The cyclic garbage collector, set for a long-running server process.

CPython's defaults (collect generation 0 every 700 net allocations of tracked objects, and the whole heap
about every 100 of those) suit short scripts. A server under load keeps thousands of requests, streams and
Kafka records alive across collections, so they are promoted and scanned again and again: at 1,000 targeted
messages/s one process spent 11.5 s of 50 s in the collector, 42 full collections of ~200 ms each (pauses
that every message in flight waits out). Measured with ``gc.callbacks`` in ``bench targeted-sustained``.

``settle`` runs once start-up is done: it collects, then freezes what survives (settings, modules, the
app, open pools: objects that live as long as the process) into the permanent generation, which no later
collection scans, and raises the thresholds so a collection runs per tens of thousands of allocations.
Reference counting still frees nearly everything at once; the collector is only for cycles.

``sweep`` runs a full collection every ``SWEEP_S``. With these thresholds CPython collects generation 1
only every 20 generation-0 collections (each per 50,000 net container allocations) and generation 2
practically never: a stream's objects live long enough to be promoted, and those that die in reference
cycles when it closes (~40 per stream; which cycles is not yet identified) waited in the older
generations. Under churn that was the process growing without bound, ~5 KB per replaced
stream (a full collection at the end of a probe phase found 37,631 unreachable objects after 900 streams,
and with it the growth per phase fell by about two thirds; the rest is the allocators keeping pages, see
docs/design/issue-21-sse-edge.md part 4). A full collection scans every unfrozen tracked object (a few ms
per thousand open streams), so it runs on a clock, not per allocation.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Final

# gen 0 every 50,000 net allocations of container objects; gen 1 every 20 of those; gen 2 every 100 gen-1
# collections (and only when the objects promoted since the last one exceed 25 % of the heap, CPython's rule)
THRESHOLDS: Final = (50_000, 20, 100)
SWEEP_S: Final = 30.0  # a full collection this often (see sweep)


def settle() -> None:
    """Collect, freeze the survivors (start-up's objects are never scanned again), raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def sweep_once() -> int:
    """A full collection; the number of unreachable objects it found."""
    return gc.collect(2)


async def sweep(every_s: float = SWEEP_S) -> None:
    """``sweep_once`` every ``every_s``, until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        sweep_once()
