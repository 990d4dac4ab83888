"""The local Kafka cluster is real and replicated: a killed leader is fenced, acks=all writes go on with
two in-sync replicas, and the restarted node catches up and rejoins the ISR."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from devstack.stack import StackInfo, kafka_node_pid, kill_kafka_node, start_kafka_node

ALL_NODES = [1, 2, 3]


@pytest.fixture
async def admin(stack: StackInfo) -> AsyncIterator[Any]:
    """A plaintext admin client on the running cluster."""
    client = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap, request_timeout_ms=10_000)
    await asyncio.wait_for(client.start(), 30)
    yield client
    await client.close()


async def partition_state(admin: Any, topic: str, partition: int) -> dict[str, Any] | None:
    """The metadata of one partition (``leader``, ``replicas``, ``isr``), or None while the broker asked
    does not know the topic yet (metadata reaches each broker a moment after creation)."""
    [described] = await asyncio.wait_for(admin.describe_topics([topic]), 15)
    states = [p for p in described["partitions"] if p["partition"] == partition]
    return dict(states[0]) if described["error_code"] == 0 and states else None


async def wait_for_state(
    admin: Any, topic: str, check: Callable[[dict[str, Any]], bool], within: float, what: str
) -> dict[str, Any]:
    """Poll partition 0 of ``topic`` until ``check(state)`` holds; fail with the last state seen."""
    deadline = time.monotonic() + within
    last: dict[str, Any] | str = "no metadata yet"
    while time.monotonic() < deadline:
        try:
            state = await partition_state(admin, topic, 0)
        except (KafkaError, TimeoutError, OSError) as exc:
            last = repr(exc)
        else:
            last = state or "topic unknown to the broker asked"
            if state is not None and check(state):
                return state
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what} not reached within {within}s; last state: {last}")


async def topic_config(admin: Any, topic: str, name: str) -> str:
    """The effective value of topic config ``name``."""
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs={name: None})
    for _ in range(20):  # a broker may not know a just-created topic yet (UNKNOWN_TOPIC_OR_PARTITION)
        [response] = await asyncio.wait_for(admin.describe_configs([resource]), 15)
        [described] = response.to_object()["resources"]
        if described["error_code"] == 0:
            [entry] = [e for e in described["config_entries"] if e["config_names"] == name]
            return str(entry["config_value"])
        await asyncio.sleep(0.5)
    raise AssertionError(f"cannot describe config {name} of {topic}: {described}")


async def test_killed_leader_is_fenced_and_rejoins_isr(stack: StackInfo, admin: Any, unique_name: str) -> None:
    topic = unique_name
    created = await asyncio.wait_for(
        admin.create_topics([NewTopic(topic, 3, 3, topic_configs={"min.insync.replicas": "2"})]), 30
    )
    assert [e["error_code"] for e in created.to_object()["topic_errors"]] == [0]

    before = await wait_for_state(
        admin, topic, lambda s: sorted(s["isr"]) == ALL_NODES, 30, "partition 0 fully replicated"
    )
    assert sorted(before["replicas"]) == ALL_NODES
    assert await topic_config(admin, topic, "min.insync.replicas") == "2"
    victim = int(before["leader"])
    assert kafka_node_pid(victim) is not None

    producer = AIOKafkaProducer(
        bootstrap_servers=stack.kafka_bootstrap, acks="all", enable_idempotence=True, request_timeout_ms=10_000
    )
    await asyncio.wait_for(producer.start(), 30)
    try:
        first = await asyncio.wait_for(producer.send_and_wait(topic, b"before-kill", partition=0), 30)
        try:
            kill_kafka_node(victim)
            assert kafka_node_pid(victim) is None

            second = await asyncio.wait_for(producer.send_and_wait(topic, b"after-kill", partition=0), 30)
            assert second.offset > first.offset

            during = await wait_for_state(
                admin, topic, lambda s: victim not in s["isr"], 30, f"node {victim} leaving the ISR"
            )
            assert during["leader"] != victim
            assert sorted(during["isr"]) == sorted(set(ALL_NODES) - {victim})
        finally:
            await asyncio.to_thread(start_kafka_node, victim)

        assert kafka_node_pid(victim) is not None
        await wait_for_state(admin, topic, lambda s: victim in s["isr"], 60, f"node {victim} rejoining the ISR")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, enable_auto_commit=False)
    await asyncio.wait_for(consumer.start(), 30)
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(values) < 2 and time.monotonic() < deadline:
            batch = await consumer.getmany(partition, timeout_ms=1000)
            values += [record.value for record in batch.get(partition, [])]
        assert values == [b"before-kill", b"after-kill"]
    finally:
        await consumer.stop()
    cluster = await asyncio.wait_for(admin.describe_cluster(), 15)
    assert sorted(b["node_id"] for b in cluster["brokers"]) == ALL_NODES
