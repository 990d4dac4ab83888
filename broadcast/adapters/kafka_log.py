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
        """Enqueue every record (the producer batches and pipelines them), then await all acknowledgements."""
        producer = self._require_producer()
        futures: list[asyncio.Future[Any] | PublishError] = []
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                for r in records:
                    try:
                        futures.append(
                            await producer.send(r.topic, value=r.value, key=r.key, headers=list(r.headers) or None)
                        )
                    except KafkaError as exc:
                        futures.append(PublishError(f"send to {r.topic} refused: {exc!r}"))
                pending = [f for f in futures if isinstance(f, asyncio.Future)]
                if pending:
                    await asyncio.wait(pending)
        except TimeoutError:
            pass
        results: list[RecordPosition | PublishError] = []
        for r, f in zip(
            records,
            futures + [PublishError("not sent before the timeout")] * (len(records) - len(futures)),
            strict=True,
        ):
            if isinstance(f, PublishError):
                results.append(f)
            elif not f.done():
                results.append(
                    PublishError(f"publish to {r.topic} not acknowledged within {self._publish_timeout_s} s")
                )
            elif f.exception() is not None:
                results.append(PublishError(f"publish to {r.topic} failed: {f.exception()!r}"))
            else:
                m = f.result()
                results.append(RecordPosition(m.topic, m.partition, m.offset))
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
