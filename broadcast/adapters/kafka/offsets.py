"""A consumer whose partition has no committed offset must learn where to start after a leader moved.

aiokafka (0.14) resets such a partition's position (``auto_offset_reset``) with a ListOffsets request to
the leader its cached metadata names. When that broker is no longer the leader it answers
``NotLeaderForPartition``; aiokafka logs "Failed fetch offsets", sleeps ``retry_backoff_ms`` and asks the
same broker again, without refreshing its metadata, so the partition is not consumed until the periodic
refresh (``metadata_max_age_ms``, 5 minutes by default). The Java client refreshes first (KAFKA-9535);
the faust fork of aiokafka has it open as robinhood/aiokafka#9.

The fault suite met it: after the hot partition's leader was SIGSTOPped and resumed, the group topic's
partitions that had no commit yet (2, 4 and 6 of 10) were not consumed for the rest of the run (90 s),
and every ALL broadcast keyed to them was lost for the connected users.

``refresh_metadata_on_stale_leader`` makes a failed ListOffsets request (a broker that is not the leader
any more, or no answer) force a metadata refresh, so the retry goes to the current leader; aiokafka
coalesces concurrent refreshes into one. ``KafkaSettings.metadata_max_age_ms`` bounds any other
stale-metadata wedge.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)


def refresh_metadata_on_stale_leader(consumer: AIOKafkaConsumer) -> bool:
    """Wrap the started ``consumer``'s ListOffsets request; False (and a warning) if this aiokafka has no
    such private method, in which case only the periodic metadata refresh ends a wedge."""
    fetcher = getattr(consumer, "_fetcher", None)
    client = getattr(consumer, "_client", None)
    request: Callable[..., Awaitable[Any]] | None = getattr(fetcher, "_proc_offset_request", None)
    if fetcher is None or client is None or request is None:
        log.warning("aiokafka internals changed: offset resets will not refresh stale leader metadata")
        return False

    async def offset_request(node_id: int, topic_data: Any) -> Any:
        try:
            return await request(node_id, topic_data)
        except KafkaError as exc:
            log.info("ListOffsets to node %s failed (%r); refreshing metadata before the retry", node_id, exc)
            client.force_metadata_update()
            raise

    fetcher._proc_offset_request = offset_request
    return True
