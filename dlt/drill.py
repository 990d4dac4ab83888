"""The fault drill: make the delivery consumers fail one broadcast on purpose, to rehearse the DLT path.

Off unless ``BROADCAST_TESTING__FAULT_DRILL_ENABLED`` is set. An admin arms a drill for a given broadcast
id or for "the next broadcast" (the first one created after arming whose event a consumer sees), with an
expiry; the delivery handlers then raise ``FaultDrillError`` for that broadcast's CREATED events. It is
retryable, so the record goes the whole way: the configured attempts with backoff, then the dead-letter
topic, the DLT store, and an admin's redrive. A redriven record (``HEADER_REDRIVEN_FROM``) fails only while a
drill armed with ``failRedrives`` names its broadcast: that rehearses a redrive of a record that still fails
(back to the dead-letter topic with one fresh set of exception headers). An admin disarms a drill at once.

The consumer asks the database once per broadcast and remembers the answer for ``ttl_s`` (a 100k-recipient
broadcast costs one query per consumer, not 100k). A redriven record is asked about each time (one query
per redriven record, only with the drill enabled), so a drill disarmed before a redrive never fails it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from broadcast.core import constants
from broadcast.core.dead_letters import DrillStore
from broadcast.core.ports.log import EventRecord

CACHE_LIMIT = 10_000


class FaultDrillError(RuntimeError):
    """Raised on purpose by an armed fault drill."""


class DrillSwitch:
    def __init__(self, store: DrillStore, ttl_s: float = 5.0) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._known: dict[str, tuple[bool, float]] = {}

    async def check(self, record: EventRecord, broadcast_id: str, created_at: datetime) -> None:
        if any(k == constants.HEADER_REDRIVEN_FROM for k, _ in record.headers):
            if await self._store.applies(broadcast_id, created_at, datetime.now(UTC), redriven=True):
                raise FaultDrillError(f"fault drill armed for broadcast {broadcast_id}, redrives included")
            return
        now = time.monotonic()
        known = self._known.get(broadcast_id)
        if known is None or known[1] < now:
            if len(self._known) >= CACHE_LIMIT:
                self._known.clear()
            known = (await self._store.applies(broadcast_id, created_at, datetime.now(UTC)), now + self._ttl_s)
            self._known[broadcast_id] = known
        if known[0]:
            raise FaultDrillError(f"fault drill armed for broadcast {broadcast_id}")
