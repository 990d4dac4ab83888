"""SCRAM-SHA-512 on the cluster's SASL_PLAINTEXT client ports: the right password produces and reads,
a wrong one is refused with an authentication error."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError

from devstack.stack import StackInfo


def scram(stack: StackInfo, password: str) -> dict[str, str]:
    """Client settings for the SCRAM listener as the stack's ``app`` user with ``password``."""
    return {
        "bootstrap_servers": stack.kafka_scram_bootstrap,
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": stack.scram_username,
        "sasl_plain_password": password,
    }


@pytest.fixture
async def topic(stack: StackInfo, unique_name: str) -> AsyncIterator[str]:
    """A fresh single-partition RF 3 topic, created over the plaintext (super-user) listener."""
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await asyncio.wait_for(admin.start(), 30)
    try:
        created = await asyncio.wait_for(admin.create_topics([NewTopic(unique_name, 1, 3)]), 30)
        assert [e["error_code"] for e in created.to_object()["topic_errors"]] == [0]
        yield unique_name
    finally:
        await admin.close()


async def test_right_password_produces_and_reads(stack: StackInfo, topic: str) -> None:
    assert stack.scram_username == "app"
    producer = AIOKafkaProducer(acks="all", **scram(stack, stack.scram_password))
    await asyncio.wait_for(producer.start(), 30)
    try:
        sent = await asyncio.wait_for(producer.send_and_wait(topic, b"hello over scram"), 30)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(topic, auto_offset_reset="earliest", **scram(stack, stack.scram_password))
    await asyncio.wait_for(consumer.start(), 30)
    try:
        records: list[Any] = []
        deadline = time.monotonic() + 30
        while not records and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            records = [r for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    assert [(r.offset, r.value) for r in records] == [(sent.offset, b"hello over scram")]


async def test_wrong_password_is_refused(stack: StackInfo, caplog: pytest.LogCaptureFixture) -> None:
    producer = AIOKafkaProducer(**scram(stack, "not-the-password"))
    caplog.set_level(logging.ERROR, logger="aiokafka")
    try:
        with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):
            await asyncio.wait_for(producer.start(), 30)
    finally:
        await producer.stop()
    refusals = [r.getMessage() for r in caplog.records if "SaslAuthenticationFailed" in r.getMessage()]
    assert refusals, caplog.text
    assert all("invalid credentials with SASL mechanism SCRAM-SHA-512" in m for m in refusals)
    assert len(refusals) == 3  # each of the three SCRAM ports refused the login
