"""Reading a topic back with a plain consumer, as a user checking what was published would."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import murmur2

from broadcast.ports import EventRecord


async def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> list[EventRecord]:
    """Read a topic from the beginning with a plain consumer (no group) until ``expected`` records came."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        records: list[EventRecord] = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                records += [
                    EventRecord(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
                    for r in batch
                ]
        # a short extra read catches records beyond the expected count (duplicates)
        for batch in (await consumer.getmany(timeout_ms=300, max_records=10_000)).values():
            records += [
                EventRecord(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
                for r in batch
            ]
        return records
    finally:
        await consumer.stop()


def default_partition(key: bytes, partitions: int = 10) -> int:
    """The partition Kafka's default partitioner (Java and aiokafka alike) picks for ``key``: an oracle
    independent of the adapter's own grouping in ``publish_many``."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions
