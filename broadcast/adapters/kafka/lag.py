"""Consumer lag from Kafka: committed offsets (admin ``OffsetFetch``) against end offsets (``ListOffsets``).

Both clients are started on first use and kept (a lag sample every few seconds should not reconnect each
time); ``close`` stops them. A partition the group never committed counts from the log start, since the
delivery consumers start from the earliest offset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition as KafkaTopicPartition

from broadcast.adapters.kafka.options import client_options
from broadcast.core.ports.log import TopicPartition
from broadcast.core.settings import KafkaSettings
from broadcast.errors import UnavailableError


class KafkaLag:
    def __init__(self, settings: KafkaSettings, timeout_s: float = 5.0) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._admin: AIOKafkaAdminClient | None = None
        self._offsets: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def lag(self, group_id: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
        try:
            async with asyncio.timeout(self._timeout_s), self._lock:
                admin, offsets = await self._clients()
                partitions = [
                    KafkaTopicPartition(topic, p)
                    for topic in topics
                    for p in sorted(offsets.partitions_for_topic(topic) or await self._refresh(offsets, topic))
                ]
                committed = await admin.list_consumer_group_offsets(group_id, partitions=partitions)
                ends = await offsets.end_offsets(partitions)
                starts = await offsets.beginning_offsets(partitions)
        except (KafkaError, TimeoutError, OSError) as exc:
            await self.close()  # the next sample reconnects
            raise UnavailableError(f"consumer lag of {group_id} unavailable: {exc!r}") from exc
        lag: dict[TopicPartition, int] = {}
        for tp in partitions:
            done = committed[tp].offset if tp in committed and committed[tp].offset >= 0 else starts[tp]
            lag[TopicPartition(tp.topic, tp.partition)] = max(ends[tp] - done, 0)
        return lag

    @staticmethod
    async def _refresh(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
        await consumer._client.force_metadata_update()
        return set(consumer.partitions_for_topic(topic) or ())

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._offsets is None:
            options = client_options(self._settings)
            admin = AIOKafkaAdminClient(**{**options, "client_id": f"{self._settings.client_id}-lag"})
            offsets = AIOKafkaConsumer(**options, group_id=None, enable_auto_commit=False)
            try:
                await admin.start()
                await offsets.start()
            except BaseException:
                try:
                    await admin.close()
                finally:
                    await offsets.stop()
                raise
            self._admin, self._offsets = admin, offsets
        return self._admin, self._offsets

    async def close(self) -> None:
        admin, offsets, self._admin, self._offsets = self._admin, self._offsets, None, None
        try:
            if admin is not None:
                await admin.close()
        finally:
            if offsets is not None:
                await offsets.stop()
