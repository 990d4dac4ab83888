"""Reading a topic back with a plain consumer, as a user checking what was published would."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from broadcast.core.ports.log import EventRecord


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


async def read_to_end(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[EventRecord]:
    """Every record of ``topic`` up to its end offsets as of the call, read with a plain consumer (no group):
    all of it, whether or not some records are there twice."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not (partitions := list(consumer.assignment())):  # every partition, once the metadata is in
            assert time.monotonic() < deadline, f"no partitions of {topic} within {timeout_s} s"
            await asyncio.sleep(0.1)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[EventRecord] = []
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            assert time.monotonic() < deadline, f"{topic} not read to its end within {timeout_s} s"
            for batch in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                records += [
                    EventRecord(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
                    for r in batch
                    if r.offset < ends[TopicPartition(r.topic, r.partition)]
                ]
        return records
    finally:
        await consumer.stop()


def default_partition(key: bytes, partitions: int = 10) -> int:
    """The partition Kafka's default partitioner (Java and aiokafka alike) picks for ``key``: an oracle
    independent of the adapter's own grouping in ``publish_many``."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions
