"""Which broadcasts a connection already has, remembered for minutes, not for ever.

A broadcast can reach one connection more than once: its catch-up and the live path overlap at connect,
a reconciliation round can offer a PENDING row the live path wrote a moment ago, and after a bus gap the
reconciler replays the group broadcasts of the gap. The repeats all come within minutes of the first
copy, so a connection remembers the ids it wrote in two generations of ``SEEN_PERIOD_S`` (at most
``SEEN_LIMIT`` ids): an id is known for between one and two periods, then forgotten (when the connection
next writes a new one).

Before, every connection kept its last 2,048 ids whatever their age: about 50 KB per connection once that
many broadcasts had been sent (25 bytes an id), 2 GB for 40,000 streams, and RSS that grew with every
broadcast until then (the churn benchmark's drift).

Generations do not turn while a repeat could still come from further back (``SeenClock.hold``):
- ``"bus gap"``: from the moment the bus listener loses its subscription until the reconciler has replayed
  the gap and the listener is subscribed again, since the replay re-offers what the gap may have dropped;
- ``"delivery marks"``: while written deliveries could not be marked DELIVERED (the database is down),
  since the reconciler re-offers their still-PENDING rows once it can read again.
When the last hold is released the clock goes on from where it stopped, so a connection forgets nothing
at that moment (what the replay just wrote included). ``SEEN_LIMIT`` bounds memory meanwhile.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

SEEN_PERIOD_S = 300.0
SEEN_LIMIT = 2_048  # ids per connection at most (two generations of half of it)
BUS_GAP = "bus gap"
DELIVERY_MARKS = "delivery marks"


class SeenClock:
    """The generation every connection's ``SeenIds`` turns by; one per hub. ``generation`` is a plain
    attribute, advanced by ``tick()`` once per event fanned out (not read from the clock per connection)."""

    def __init__(self, period_s: float = SEEN_PERIOD_S, now: Callable[[], float] = time.monotonic) -> None:
        self._period_s = period_s
        self._now = now
        self._offset = 0  # generations skipped while held, so the count goes on from where it stopped
        self._holders: set[str] = set()
        self.generation = self._running()

    def _running(self) -> int:
        return int(self._now() // self._period_s) + self._offset

    def tick(self) -> None:
        """Bring ``generation`` up to the time, unless held."""
        if not self._holders:
            self.generation = self._running()

    def hold(self, reason: str) -> None:
        """Stop turning generations until ``release(reason)`` (and every other hold's release)."""
        self.tick()
        self._holders.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self._holders:
            return
        self._holders.discard(reason)
        if not self._holders:
            self._offset += self.generation - self._running()

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._holders)


class SeenIds:
    """The broadcast ids one connection wrote in the current and the previous generation."""

    __slots__ = ("_clock", "_current", "_generation", "_previous")

    def __init__(self, clock: SeenClock) -> None:
        self._clock = clock
        self._generation = clock.generation
        # dicts, not sets: a compact dict costs about half a set's memory per id
        self._previous: dict[str, None] = {}
        self._current: dict[str, None] = {}

    def first_time(self, broadcast_id: str) -> bool:
        """True (and remembered) unless the connection already wrote ``broadcast_id``."""
        if broadcast_id in self._current or broadcast_id in self._previous:
            return False
        generation = self._clock.generation
        if generation != self._generation:
            self._previous = self._current if generation == self._generation + 1 else {}
            self._current, self._generation = {}, generation
        elif len(self._current) >= SEEN_LIMIT // 2:  # many in one period: turn early, memory stays bounded
            self._previous, self._current = self._current, {}
        # interned: one copy of an id for every connection, whether it came live (already one shared object)
        # or in a catch-up (a string of each connection's own, read from the database)
        self._current[sys.intern(broadcast_id)] = None
        return True

    def __contains__(self, broadcast_id: object) -> bool:
        return broadcast_id in self._current or broadcast_id in self._previous

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)
