"""Who a group (ALL/ROLE) broadcast reached, without a row per user (DESIGN.md §2: a broadcast to a million
users must not cost a million rows).

Every user is given a small number once (``user_numbers``, assigned the first time one of the user's
streams is written a group message). Each process keeps, per group broadcast it wrote to streams lately,
a roaring bitmap of the numbers of the users it reached (``Reach``), and saves it as one row per broadcast
and tally (``group_reach``), rewritten as the bitmap grows. A tally is this process's bitmap of one
broadcast: its key is the process's writer id and a sequence number, so two processes, or one process
before and after a restart, never overwrite each other's users.

The stats' delivered count of a group broadcast is the size of the union of its tallies and of the users
holding a row for it (a read writes one, as do deliveries recorded before the bitmaps): a user with three
tabs, or tabs on two instances, counts once. A million users take about 150 KB (random numbers; far less
when they are dense), against ~200 MB of rows and index entries.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pyroaring import BitMap

IDLE_S = 600.0  # a tally not written to for this long is dropped from memory (its row stays)
NUMBERS_CACHED = 200_000  # user numbers remembered per process (least recently used go first)


@dataclass(frozen=True, slots=True)
class ReachRow:
    """One tally as stored: the broadcast, the tally's key, the bitmap's bytes and how many users it holds."""

    broadcast_id: str
    tally: str
    users: bytes
    reached: int


def union(bitmaps: Iterable[bytes], numbers: Iterable[int] = ()) -> BitMap:
    """The users of stored tallies, and of ``numbers``, each once."""
    reached = BitMap(numbers)
    for stored in bitmaps:
        reached |= BitMap.deserialize(stored)
    return reached


@dataclass(slots=True)
class _Tally:
    key: str
    users: BitMap = field(default_factory=BitMap)
    touched: float = 0.0
    dirty: bool = False


class Reach:
    """This process's tallies, and the user numbers it knows. Not thread-safe: one task adds and saves."""

    def __init__(
        self,
        writer: str,
        idle_s: float = IDLE_S,
        numbers_cached: int = NUMBERS_CACHED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._writer = f"{writer}/{uuid.uuid4().hex[:12]}"  # this process lifetime's own keys
        self._sequence = 0
        self._idle_s, self._clock = idle_s, clock
        self._tallies: dict[str, _Tally] = {}
        self._numbers: OrderedDict[str, int] = OrderedDict()
        self._numbers_cached = numbers_cached

    def unknown(self, user_ids: Iterable[str]) -> list[str]:
        """The users whose number this process does not know yet."""
        return [u for u in dict.fromkeys(user_ids) if u not in self._numbers]

    def learn(self, numbers: Mapping[str, int]) -> None:
        for user_id, number in numbers.items():
            self._numbers[user_id] = number
        while len(self._numbers) > self._numbers_cached:
            self._numbers.popitem(last=False)

    def add(self, broadcast_id: str, user_ids: Iterable[str], numbers: Mapping[str, int] | None = None) -> list[str]:
        """Count ``user_ids`` as reached by ``broadcast_id``, numbered from ``numbers`` or what this process
        knows; returns those whose number is unknown (not counted)."""
        tally = self._tallies.get(broadcast_id)
        if tally is None:
            self._sequence += 1
            tally = self._tallies[broadcast_id] = _Tally(f"{self._writer}/{self._sequence}")
        tally.touched = self._clock()
        unknown: list[str] = []
        for user_id in user_ids:
            number = numbers.get(user_id) if numbers else None
            if number is None:
                number = self._numbers.get(user_id)
            if number is None:
                unknown.append(user_id)
            elif number not in tally.users:
                tally.users.add(number)
                tally.dirty = True
        return unknown

    def dirty(self) -> list[ReachRow]:
        """The tallies that grew since they were last saved (whole: a row is rewritten, never merged)."""
        return [
            ReachRow(broadcast_id, t.key, t.users.serialize(), len(t.users))
            for broadcast_id, t in self._tallies.items()
            if t.dirty
        ]

    def saved(self, rows: Sequence[ReachRow]) -> None:
        """``rows`` (from ``dirty``, with nothing added since) are stored; idle tallies leave memory."""
        for row in rows:
            tally = self._tallies.get(row.broadcast_id)
            if tally is not None and tally.key == row.tally and len(tally.users) == row.reached:
                tally.dirty = False
        idle_since = self._clock() - self._idle_s
        for broadcast_id in [b for b, t in self._tallies.items() if not t.dirty and t.touched < idle_since]:
            del self._tallies[broadcast_id]

    def __len__(self) -> int:
        return len(self._tallies)
