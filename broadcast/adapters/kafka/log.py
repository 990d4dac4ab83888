"""The Kafka event log (aiokafka): an idempotent ``acks=all`` producer and explicit-commit consumers.

Every await on the producer is bounded by a timeout (with idempotence on, aiokafka never expires a send
while brokers are down), and failures surface as ``PublishError``. Consumers never auto-commit; their
rebalance callbacks and commit failures (``CommitFailedError``) reach callers in the port's vocabulary.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedForMessageFormatError,
)
from aiokafka.partitioner import murmur2
from aiokafka.structs import OffsetAndMetadata
from aiokafka.structs import TopicPartition as KafkaTopicPartition

from broadcast.adapters.kafka.health import TIMEOUTS, ProducerWatch
from broadcast.adapters.kafka.lag import KafkaLag
from broadcast.adapters.kafka.offsets import refresh_metadata_on_stale_leader
from broadcast.adapters.kafka.options import client_options
from broadcast.adapters.kafka.producer import ProducerSlot, breaks_session
from broadcast.core.ports.log import EventRecord, OutgoingRecord, RebalanceCallback, RecordPosition, TopicPartition
from broadcast.core.settings import KafkaSettings
from broadcast.errors import CommitFailedError, PublishError, UnavailableError
from broadcast.observability.loops import hand_back

# The broker (or the client, before sending) refused the record itself: sending it again cannot succeed.
# A topic this principal may not write to (no Write ACL) is one too (RELIABILITY #21): its rows go to the
# outbox's dead state after ``relay.poison_attempts`` refusals, so the lane goes on; an admin redrives them
# once the ACL is granted.
POISON = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    CorruptRecordException,
    InvalidTimestampError,
    UnsupportedForMessageFormatError,
    TopicAuthorizationFailedError,
)


def _describe(settings: KafkaSettings) -> str:
    """Where and how we connect, for errors (never the password)."""
    where = f"{settings.bootstrap_servers} ({settings.security_protocol}"
    if settings.sasl_mechanism:
        where += f", {settings.sasl_mechanism} as {settings.sasl_username!r}: if the log shows "
        where += "SaslAuthenticationFailed, check BROADCAST_KAFKA__SASL_USERNAME/SASL_PASSWORD"
    return where + ")"


class KafkaEventLog:
    """Owns one idempotent producer; hands out consumer-group subscriptions. An async context manager."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._publish_timeout_s = settings.publish_timeout_seconds
        self._slot = ProducerSlot(self._new_producer, self._publish_timeout_s, _describe(settings))
        self.watch = ProducerWatch()
        self._lag: KafkaLag | None = None

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **client_options(self._settings),
            acks="all",
            enable_idempotence=True,
            linger_ms=self._settings.producer_linger_ms,
            max_batch_size=self._settings.producer_batch_bytes,
        )

    async def __aenter__(self) -> KafkaEventLog:
        await self._slot.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._lag is not None:
            await self._lag.close()
        await self._slot.stop()

    @property
    def producer_renewals(self) -> int:
        """How many times a broken idempotent session was replaced by a new producer."""
        return self._slot.renewals

    def publisher(self) -> KafkaEventLog:
        return self

    def _require_producer(self) -> AIOKafkaProducer:
        producer = self._slot.current
        if producer is None:
            raise UnavailableError("Kafka producer is not started")
        return producer

    async def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> RecordPosition:
        producer = self._require_producer()
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                metadata = await producer.send_and_wait(
                    topic, value=value, key=key, partition=partition, headers=list(headers) or None
                )
        except (KafkaError, TimeoutError) as exc:
            if isinstance(exc, TIMEOUTS):
                self.watch.failed()
            if breaks_session(exc):
                await self._slot.renew(producer, exc)
            raise PublishError(f"publish to {topic} not acknowledged: {exc!r}") from exc
        self.watch.acknowledged()
        return RecordPosition(metadata.topic, metadata.partition, metadata.offset)

    async def publish_many(self, records: Sequence[OutgoingRecord]) -> list[RecordPosition | PublishError]:
        """Publish in order, as whole record batches per partition, then await every acknowledgement.

        Records are grouped by the partition Kafka's default partitioner picks for their key (murmur2, as
        the Java client does), keeping their order within a partition, and appended to batch builders
        submitted with ``send_batch``: a few microseconds per record instead of a ``send`` call each.
        """
        producer = self._require_producer()
        results: list[RecordPosition | PublishError] = [PublishError("not sent before the timeout")] * len(records)
        timed_out = False
        sent: list[tuple[asyncio.Future[Any], str, int, list[tuple[int, int]]]] = []
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                groups: dict[tuple[str, int], list[int]] = {}
                counts: dict[str, int] = {}
                for index, r in enumerate(records):
                    await hand_back(index + 1)
                    if r.topic not in counts:
                        counts[r.topic] = len(await producer.partitions_for(r.topic))
                    partition = r.partition if r.partition is not None else _partition(r.key, counts[r.topic], index)
                    groups.setdefault((r.topic, partition), []).append(index)
                appended = 0
                for (topic, partition), indexes in groups.items():
                    batch, members = producer.create_batch(), list[tuple[int, int]]()
                    for index in indexes:
                        r = records[index]
                        appended += 1
                        await hand_back(appended)
                        meta = batch.append(key=r.key, value=r.value, timestamp=None, headers=list(r.headers))
                        if meta is None:  # full: submit it and start the next one
                            sent.append(
                                (
                                    await producer.send_batch(batch, topic, partition=partition),
                                    topic,
                                    partition,
                                    members,
                                )
                            )
                            batch, members = producer.create_batch(), list[tuple[int, int]]()
                            meta = batch.append(key=r.key, value=r.value, timestamp=None, headers=list(r.headers))
                        members.append((index, meta.offset))
                    sent.append(
                        (await producer.send_batch(batch, topic, partition=partition), topic, partition, members)
                    )
                await asyncio.wait([future for future, *_ in sent])
        except TimeoutError:
            timed_out = True
        except KafkaError as exc:
            failure = PublishError(f"publish refused: {exc!r}", poison=isinstance(exc, POISON))
            results = [failure] * len(records)
            if breaks_session(exc):
                await self._slot.renew(producer, exc)
        for future, topic, partition, members in sent:
            outcome = _outcome(future, topic, self._publish_timeout_s)
            for index, relative in members:
                results[index] = (
                    outcome
                    if isinstance(outcome, PublishError)
                    else RecordPosition(topic, partition, outcome + relative)
                )
        if any(isinstance(r, RecordPosition) for r in results):
            self.watch.acknowledged()
        elif timed_out or any(_timed_out(future) for future, *_ in sent):
            self.watch.failed()
        broken = [e for f, *_ in sent if f.done() and not f.cancelled() and breaks_session(e := f.exception())]
        if broken:
            await self._slot.renew(producer, broken[0])
        return results

    async def lag(self, group_id: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
        if self._lag is None:
            self._lag = KafkaLag(self._settings)
        return await self._lag.lag(group_id, topics)

    async def partitions_for(self, topic: str) -> int:
        producer = self._require_producer()
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                partitions = await producer.partitions_for(topic)
        except (KafkaError, TimeoutError) as exc:
            raise UnavailableError(f"no metadata for {topic}: {exc!r}") from exc
        return len(partitions)

    @asynccontextmanager
    async def subscribe(
        self,
        topics: Iterable[str],
        group_id: str,
        *,
        on_revoked: RebalanceCallback | None = None,
        on_assigned: RebalanceCallback | None = None,
    ) -> AsyncIterator[KafkaSubscription]:
        consumer = AIOKafkaConsumer(
            **client_options(self._settings),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_interval_ms=self._settings.max_poll_interval_ms,
        )
        consumer.subscribe(list(topics), listener=_RebalanceListener(on_revoked, on_assigned))
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise UnavailableError(f"cannot start consumer for group {group_id}: {exc!r}") from exc
        refresh_metadata_on_stale_leader(consumer)
        try:
            yield KafkaSubscription(consumer)
        finally:
            await consumer.stop()


def _partition(key: bytes | None, partitions: int, index: int) -> int:
    """Kafka's default partitioner: murmur2 of the key (keyless records spread round-robin)."""
    if key is None:
        return index % partitions
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def _timed_out(future: asyncio.Future[Any]) -> bool:
    return not future.done() or (not future.cancelled() and isinstance(future.exception(), TIMEOUTS))


def _outcome(future: asyncio.Future[Any], topic: str, timeout_s: float) -> int | PublishError:
    """The base offset of an acknowledged batch, or why it was not acknowledged."""
    if not future.done():
        return PublishError(f"publish to {topic} not acknowledged within {timeout_s} s")
    if future.cancelled():
        return PublishError(f"publish to {topic} cancelled")
    if (exc := future.exception()) is not None:
        return PublishError(f"publish to {topic} failed: {exc!r}", poison=isinstance(exc, POISON))
    return int(future.result().offset)


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Hands aiokafka's rebalance callbacks to the port's, in the port's vocabulary.

    aiokafka awaits ``on_partitions_revoked`` in its coordination task before it rejoins the group, while
    the old generation's commits still succeed; it logs (and swallows) a callback's exception.
    """

    def __init__(self, on_revoked: RebalanceCallback | None, on_assigned: RebalanceCallback | None) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Iterable[KafkaTopicPartition]) -> None:
        if self._on_revoked is not None:
            await self._on_revoked(_ours(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[KafkaTopicPartition]) -> None:
        if self._on_assigned is not None:
            await self._on_assigned(_ours(assigned))


def _ours(partitions: Iterable[KafkaTopicPartition]) -> frozenset[TopicPartition]:
    return frozenset(TopicPartition(tp.topic, tp.partition) for tp in partitions)


class KafkaSubscription:
    """One aiokafka consumer in a group, behind the ``EventSubscription`` port."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer

    async def fetch(self, max_records: int = 500, timeout_s: float = 1.0) -> list[EventRecord]:
        try:
            batches = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            raise UnavailableError(f"fetch failed: {exc!r}") from exc
        records: list[EventRecord] = []
        for tp in sorted(batches, key=lambda t: (t.topic, t.partition)):
            for r in batches[tp]:
                headers = tuple((k, bytes(v)) for k, v in (r.headers or ()))
                records.append(
                    EventRecord(
                        r.topic, r.partition, r.offset, r.key, r.value, headers, r.timestamp, r.timestamp_type == 1
                    )
                )
        return records

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit explicit offsets; a rebalance or an unassigned partition raises ``CommitFailedError``.

        aiokafka raises its ``CommitFailedError`` when the group rebalanced under the commit and
        ``IllegalStateError`` for a partition not (or no longer) assigned; any other Kafka error that is
        not retried inside aiokafka means the commit did not happen either. Retriable errors (coordinator
        moving) are retried by aiokafka until they clear: callers bound the await with a timeout.
        """
        if not offsets:
            return
        try:
            await self._consumer.commit(
                {KafkaTopicPartition(tp.topic, tp.partition): OffsetAndMetadata(o, "") for tp, o in offsets.items()}
            )
        except KafkaError as exc:  # CommitFailedError and IllegalStateError are KafkaErrors
            raise CommitFailedError(f"commit of {dict(offsets)} failed: {exc!r}") from exc

    async def committed(self, partition: TopicPartition) -> int | None:
        offset = await self._consumer.committed(KafkaTopicPartition(partition.topic, partition.partition))
        return None if offset is None else int(offset)

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment())

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(KafkaTopicPartition(partition.topic, partition.partition), offset)

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self._consumer.pause(*self._held(partitions))

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self._consumer.resume(*self._held(partitions))

    def _held(self, partitions: Iterable[TopicPartition]) -> list[KafkaTopicPartition]:
        """Those of ``partitions`` still assigned (aiokafka refuses the others)."""
        held = self._consumer.assignment()
        return [tp for tp in (KafkaTopicPartition(p.topic, p.partition) for p in partitions) if tp in held]
