"""A broken idempotent session on the real cluster: the event log starts a new producer, nothing stays stuck.

The desynchronised sequence number that a leader failover can leave behind is made on purpose here: the
producer's next sequence for one partition is moved ahead, so the broker answers
``OutOfOrderSequenceNumber`` to the next batch, as it did in the fault suite after a broker kill. Before
the fix every later send to that partition failed the same way until the process restarted.
"""

from __future__ import annotations

import time

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from broadcast.adapters.kafka.admin import ensure_topics
from broadcast.adapters.kafka.log import KafkaEventLog
from broadcast.core.ports.log import OutgoingRecord, RecordPosition
from broadcast.core.settings import KafkaSettings
from broadcast.errors import PublishError
from devstack.stack import StackInfo

PARTITION = 0


def desynchronise(log: KafkaEventLog, topic: str) -> None:
    producer = log._require_producer()  # the test breaks the session on purpose
    manager = producer._txn_manager
    manager.increment_sequence_number(TopicPartition(topic, PARTITION), 7)


async def read_all(bootstrap: str, topic: str, until_offset: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    try:
        tp = TopicPartition(topic, PARTITION)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        values: list[bytes] = []
        while await consumer.position(tp) < until_offset:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            values += [record.value for record in batch.get(tp, []) if record.value is not None]
        return values
    finally:
        await consumer.stop()


async def first_record(log: KafkaEventLog, topic: str) -> RecordPosition:
    """A fresh topic's leader can take a moment: retried until acknowledged."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await log.publish(topic, b"k", b"before", partition=PARTITION)
        except PublishError:
            assert time.monotonic() < deadline, f"{topic} never took a record"


@pytest.mark.parametrize("call", ["publish", "publish_many"])
async def test_a_broken_idempotent_session_is_replaced_and_the_next_send_succeeds(
    stack: StackInfo, unique_name: str, call: str
) -> None:
    settings = KafkaSettings(bootstrap_servers=stack.kafka_bootstrap, partitions=1, client_id=unique_name)
    reports = await ensure_topics(settings, [unique_name])
    assert all(r.ok for r in reports), reports
    async with KafkaEventLog(settings) as log:
        first = await first_record(log, unique_name)
        desynchronise(log, unique_name)

        async def send(value: bytes) -> RecordPosition:
            if call == "publish":
                return await log.publish(unique_name, b"k", value, partition=PARTITION)
            [outcome] = await log.publish_many([OutgoingRecord(unique_name, b"k", value, (), PARTITION)])
            if isinstance(outcome, PublishError):
                raise outcome
            return outcome

        with pytest.raises(PublishError, match="OutOfOrderSequence"):
            await send(b"refused")
        # what the relay does next round: the same row again, and the ones after it
        again = await send(b"refused")
        after = await send(b"after")
        assert (again.offset, after.offset) == (first.offset + 1, first.offset + 2)
        assert log.producer_renewals == 1
    assert await read_all(stack.kafka_bootstrap, unique_name, after.offset + 1) == [b"before", b"refused", b"after"]
