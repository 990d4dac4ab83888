"""A consumer that resets a partition's position while its metadata names a broker that is not the leader.

This is what the fault suite's broker SIGSTOP left behind: the group topic's partitions without a commit
asked the paused (and no longer leading) broker for their start offset, were told
``NotLeaderForPartition``, and asked it again for the rest of the run. Here the stale metadata is made on
purpose (the partition's leader in the consumer's cache is set to a follower) and the periodic refresh is
5 minutes away, so only a refresh on the failed ListOffsets request can end the reset in time.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka.structs import TopicPartition as KafkaTopicPartition

from broadcast.adapters.kafka.admin import ensure_topics
from broadcast.adapters.kafka.log import KafkaEventLog, KafkaSubscription
from broadcast.core.ports.log import EventRecord
from broadcast.core.settings import KafkaSettings
from broadcast.errors import PublishError
from devstack.stack import StackInfo


async def fetch_some(sub: KafkaSubscription, timeout_s: float) -> list[EventRecord]:
    deadline = time.monotonic() + timeout_s
    while not (records := await sub.fetch(10, 0.5)):
        assert time.monotonic() < deadline, "nothing fetched"
    return records


async def test_an_offset_reset_told_not_leader_refreshes_metadata_and_reaches_the_leader(
    stack: StackInfo, unique_name: str
) -> None:
    settings = KafkaSettings(
        bootstrap_servers=stack.kafka_bootstrap, partitions=1, client_id=unique_name, metadata_max_age_ms=300_000
    )
    reports = await ensure_topics(settings, [unique_name])
    assert all(r.ok for r in reports), reports
    async with KafkaEventLog(settings) as log:
        deadline = time.monotonic() + 60
        while True:  # a fresh topic's leader can take a moment
            try:
                await log.publish(unique_name, b"k", b"first", partition=0)
                break
            except PublishError:
                assert time.monotonic() < deadline, f"{unique_name} never took a record"
        async with log.subscribe([unique_name], unique_name + "-group") as sub:
            assert [r.value for r in await fetch_some(sub, 60)] == [b"first"]
            consumer = sub._consumer  # the test makes the consumer's metadata stale on purpose
            cluster = consumer._client.cluster
            current = cluster._partitions[unique_name][0]
            follower = next(node for node in current.replicas if node != current.leader)
            cluster._partitions[unique_name][0] = current._replace(leader=follower)
            started = time.monotonic()
            # no commit yet: the position is reset (auto_offset_reset=earliest) by a ListOffsets request
            await asyncio.wait_for(consumer.seek_to_beginning(KafkaTopicPartition(unique_name, 0)), 20)
            assert [r.value for r in await fetch_some(sub, 20)] == [b"first"]
            print(
                f"reset asked node {follower} (not the leader, {current.leader}); reached the leader and "
                f"fetched again after {time.monotonic() - started:.2f} s"
            )
