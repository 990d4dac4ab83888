"""Kafka readiness: whether the producer still gets acknowledgements (``ProducerWatch``, fed by
``KafkaEventLog``) and the readiness check built on it (``KafkaHealth``)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaError, KafkaTimeoutError, RequestTimedOutError
from aiokafka.structs import PartitionMetadata

from broadcast.errors import UnavailableError

if TYPE_CHECKING:
    from broadcast.adapters.kafka.log import KafkaEventLog

TIMEOUTS = (TimeoutError, KafkaTimeoutError, RequestTimedOutError)  # what a wedged producer looks like


class ProducerWatch:
    """Whether the producer still gets acknowledgements: since when publishes have been timing out, if
    they still are. Only timeouts count (a record the broker refuses, e.g. too large, says nothing about
    the producer), and a failure streak with no failure in the last ``recent_s`` is over, so a producer
    that failed once and then had nothing to send is not wedged."""

    def __init__(self, recent_s: float = 30.0) -> None:
        self.recent_s = recent_s
        self.failing_since: float | None = None
        self.last_failed: float | None = None
        self.last_ack: float | None = None

    def acknowledged(self) -> None:
        self.failing_since, self.last_ack = None, time.monotonic()

    def failed(self) -> None:
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        self.last_failed = now

    def wedged_for(self) -> float:
        """Seconds publishes have timed out without a single acknowledgement (0 when they do not)."""
        now = time.monotonic()
        if self.failing_since is None or self.last_failed is None or now - self.last_failed > self.recent_s:
            return 0.0
        return now - self.failing_since


class KafkaHealth:
    """Readiness: the producer is started, its sender task alive, publishing not failing for longer than
    ``wedge_s`` (an idempotent producer can wedge: every send times out while metadata still answers),
    a metadata round trip names at least one live broker, and every partition of ``topics`` has at least
    ``min_insync`` in-sync replicas (with fewer, every ``acks=all`` publish to it is refused with
    ``NOT_ENOUGH_REPLICAS``: the outbox keeps the broadcasts, but nothing reaches users until it recovers)."""

    def __init__(
        self,
        log: KafkaEventLog,
        timeout_s: float = 3.0,
        wedge_s: float = 60.0,
        topics: tuple[str, ...] = (),
        min_insync: int = 1,
    ) -> None:
        self._log = log
        self._timeout_s = timeout_s
        self._wedge_s = wedge_s
        self._topics = topics
        self._min_insync = min_insync

    async def check(self) -> None:
        producer = self._log._require_producer()
        sender = getattr(getattr(producer, "_sender", None), "_sender_task", None)
        if sender is not None and sender.done():
            raise UnavailableError("kafka producer wedged: its sender task has stopped")
        if (failing := self._log.watch.wedged_for()) > self._wedge_s:
            raise UnavailableError(
                f"kafka producer wedged: no acknowledgement for {failing:.0f} s of failing publishes"
            )
        try:
            async with asyncio.timeout(self._timeout_s):
                cluster = await producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError) as exc:
            raise UnavailableError(f"kafka metadata unavailable: {type(exc).__name__}") from exc
        if not cluster.brokers():
            raise UnavailableError("kafka reports no brokers")
        short = under_min_insync(cluster, self._topics, self._min_insync)
        if short:
            raise UnavailableError(
                f"kafka: {len(short)} partition(s) with fewer than min.insync.replicas={self._min_insync} in-sync "
                f"replicas ({', '.join(short[:5])}): publishing to them fails with NOT_ENOUGH_REPLICAS"
            )


def under_min_insync(cluster: ClusterMetadata, topics: tuple[str, ...], min_insync: int) -> list[str]:
    """``topic-partition`` of every partition of ``topics`` whose in-sync replica set (as the last metadata
    response reported it) is smaller than ``min_insync``, or that has no leader."""
    partitions: dict[str, dict[int, PartitionMetadata]] = getattr(cluster, "_partitions", {})
    short = []
    for topic in topics:
        for number, meta in sorted(partitions.get(topic, {}).items()):
            if meta.leader < 0 or len(meta.isr) < min_insync:
                short.append(f"{topic}-{number}")
    return short
