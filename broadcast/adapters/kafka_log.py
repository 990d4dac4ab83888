"""The Kafka event log (aiokafka): an idempotent ``acks=all`` producer and explicit-commit consumers.

Every await on the producer is bounded by a timeout (with idempotence on, aiokafka never expires a send
while brokers are down), and failures surface as ``PublishError``. Consumers never auto-commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from aiokafka.structs import OffsetAndMetadata
from aiokafka.structs import TopicPartition as KafkaTopicPartition

from broadcast.errors import PublishError, UnavailableError
from broadcast.ports import EventRecord, OutgoingRecord, RecordPosition, TopicPartition
from broadcast.settings import KafkaSettings


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by producers, consumers and the admin client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    return options


class KafkaEventLog:
    """Owns one idempotent producer; hands out consumer-group subscriptions. An async context manager."""

    def __init__(self, settings: KafkaSettings, publish_timeout_s: float = 30.0) -> None:
        self._settings = settings
        self._publish_timeout_s = publish_timeout_s
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> KafkaEventLog:
        producer = AIOKafkaProducer(
            **client_options(self._settings),
            acks="all",
            enable_idempotence=True,
            linger_ms=self._settings.producer_linger_ms,
            max_batch_size=self._settings.producer_batch_bytes,
        )
        try:
            await asyncio.wait_for(producer.start(), self._publish_timeout_s)
        except (KafkaError, TimeoutError, OSError) as exc:
            await producer.stop()
            raise UnavailableError(f"cannot connect to Kafka at {self._settings.bootstrap_servers}: {exc!r}") from exc
        self._producer = producer
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    def publisher(self) -> KafkaEventLog:
        return self

    def _require_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise UnavailableError("Kafka producer is not started")
        return self._producer

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
            raise PublishError(f"publish to {topic} not acknowledged: {exc!r}") from exc
        return RecordPosition(metadata.topic, metadata.partition, metadata.offset)

    async def publish_many(self, records: Sequence[OutgoingRecord]) -> list[RecordPosition | PublishError]:
        """Publish in order, as whole record batches per partition, then await every acknowledgement.

        Records are grouped by the partition Kafka's default partitioner picks for their key (murmur2, as
        the Java client does), keeping their order within a partition, and appended to batch builders
        submitted with ``send_batch``: a few microseconds per record instead of a ``send`` call each.
        """
        producer = self._require_producer()
        results: list[RecordPosition | PublishError] = [PublishError("not sent before the timeout")] * len(records)
        sent: list[tuple[asyncio.Future[Any], str, int, list[tuple[int, int]]]] = []
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                groups: dict[tuple[str, int], list[int]] = {}
                counts: dict[str, int] = {}
                for index, r in enumerate(records):
                    if r.topic not in counts:
                        counts[r.topic] = len(await producer.partitions_for(r.topic))
                    partition = _partition(r.key, counts[r.topic], index)
                    groups.setdefault((r.topic, partition), []).append(index)
                for (topic, partition), indexes in groups.items():
                    batch, members = producer.create_batch(), list[tuple[int, int]]()
                    for index in indexes:
                        r = records[index]
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
            pass
        except KafkaError as exc:
            failure = PublishError(f"publish refused: {exc!r}")
            results = [failure] * len(records)
        for future, topic, partition, members in sent:
            outcome = _outcome(future, topic, self._publish_timeout_s)
            for index, relative in members:
                results[index] = (
                    outcome
                    if isinstance(outcome, PublishError)
                    else RecordPosition(topic, partition, outcome + relative)
                )
        return results

    async def partitions_for(self, topic: str) -> int:
        producer = self._require_producer()
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                partitions = await producer.partitions_for(topic)
        except (KafkaError, TimeoutError) as exc:
            raise UnavailableError(f"no metadata for {topic}: {exc!r}") from exc
        return len(partitions)

    @asynccontextmanager
    async def subscribe(self, topics: Iterable[str], group_id: str) -> AsyncIterator[KafkaSubscription]:
        consumer = AIOKafkaConsumer(
            *topics,
            **client_options(self._settings),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise UnavailableError(f"cannot start consumer for group {group_id}: {exc!r}") from exc
        try:
            yield KafkaSubscription(consumer)
        finally:
            await consumer.stop()


def _partition(key: bytes | None, partitions: int, index: int) -> int:
    """Kafka's default partitioner: murmur2 of the key (keyless records spread round-robin)."""
    if key is None:
        return index % partitions
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def _outcome(future: asyncio.Future[Any], topic: str, timeout_s: float) -> int | PublishError:
    """The base offset of an acknowledged batch, or why it was not acknowledged."""
    if not future.done():
        return PublishError(f"publish to {topic} not acknowledged within {timeout_s} s")
    if future.cancelled():
        return PublishError(f"publish to {topic} cancelled")
    if (exc := future.exception()) is not None:
        return PublishError(f"publish to {topic} failed: {exc!r}")
    return int(future.result().offset)


class KafkaSubscription:
    """One aiokafka consumer in a group, behind the ``EventSubscription`` port."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer

    async def fetch(self, max_records: int = 500, timeout_s: float = 1.0) -> list[EventRecord]:
        batches = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        records: list[EventRecord] = []
        for tp in sorted(batches, key=lambda t: (t.topic, t.partition)):
            for r in batches[tp]:
                headers = tuple((k, bytes(v)) for k, v in (r.headers or ()))
                records.append(EventRecord(r.topic, r.partition, r.offset, r.key, r.value, headers, r.timestamp))
        return records

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        await self._consumer.commit(
            {KafkaTopicPartition(tp.topic, tp.partition): OffsetAndMetadata(o, "") for tp, o in offsets.items()}
        )

    async def committed(self, partition: TopicPartition) -> int | None:
        offset = await self._consumer.committed(KafkaTopicPartition(partition.topic, partition.partition))
        return None if offset is None else int(offset)

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment())

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(KafkaTopicPartition(partition.topic, partition.partition), offset)


class KafkaHealth:
    """Readiness: the producer is started and a metadata round trip names at least one live broker."""

    def __init__(self, log: KafkaEventLog, timeout_s: float = 3.0) -> None:
        self._log = log
        self._timeout_s = timeout_s

    async def check(self) -> None:
        producer = self._log._require_producer()
        try:
            async with asyncio.timeout(self._timeout_s):
                cluster = await producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError) as exc:
            raise UnavailableError(f"kafka metadata unavailable: {type(exc).__name__}") from exc
        if not cluster.brokers():
            raise UnavailableError("kafka reports no brokers")
