"""The dead-letter path under faults, on the real stack: the DLT topic missing, the database stopped.

Invariant 5 of the design: a poison record never blocks a partition, a failed DLT publish is retried and
never skipped (nothing is committed past the record until the dead letter is acknowledged), and a
transient outage is retried — not dead-lettered — until it is over.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from broadcast.adapters.kafka.admin import ensure_topics
from broadcast.adapters.kafka.log import KafkaEventLog
from broadcast.core.ports.log import EventRecord, TopicPartition
from broadcast.core.settings import KafkaSettings
from broadcast.errors import ValidationError
from consumers.container import ListenerContainer
from consumers.errors import BackOff, DefaultErrorHandler
from consumers.listener import Listener
from devstack import postgres
from devstack.servers import Server
from devstack.stack import StackInfo
from dlt.recoverer import DeadLetterPublishingRecoverer
from tests.auth import bearer
from tests.sse_client import SseClient
from tests.topics import read_topic
from tests.waiting import wait_until

ADMIN = bearer("admin", "admin")


async def test_a_missing_dlt_topic_keeps_the_record_uncommitted_until_the_dead_letter_lands(
    stack: StackInfo, unique_name: str
) -> None:
    settings = KafkaSettings(
        bootstrap_servers=stack.kafka_bootstrap, client_id=unique_name, partitions=3, publish_timeout_seconds=2
    )
    main, dlt = f"{unique_name}.orders", f"{unique_name}.orders-dlt"
    assert all(r.ok for r in await ensure_topics(settings, [main]))
    handled: list[bytes] = []

    async def handle(record: EventRecord) -> None:
        if record.value == b"poison":
            raise ValidationError("poison")
        handled.append(record.value or b"")

    async with KafkaEventLog(settings) as log:
        publisher = log.publisher()
        await publisher.publish(main, b"k", b"poison", partition=0)
        await publisher.publish(main, b"k", b"good", partition=0)
        handler = DefaultErrorHandler(
            DeadLetterPublishingRecoverer(publisher, unique_name), BackOff(max_attempts=1, initial_s=0.5)
        )
        listener = Listener("t", (main,), unique_name, handle, poll_timeout_s=0.2)
        async with ListenerContainer(log, listener, handler):
            await wait_until(lambda: handler.counters.recovery_failures >= 2, 60, "two failed DLT publishes")
            assert handled == [], "nothing after the poison record may be handled while it is not dead-lettered"
            async with log.subscribe([main], unique_name + "-probe") as probe:
                assert await probe.committed(TopicPartition(main, 0)) is None
            failures = handler.counters.recovery_failures
            assert all(r.ok for r in await ensure_topics(settings, [dlt]))
            took = await wait_until(lambda: handled == [b"good"], 60, "the record after the poison")
        [letter] = await read_topic(stack.kafka_bootstrap, dlt, 1)
        assert (letter.partition, letter.key, letter.value) == (0, b"k", b"poison")
        async with log.subscribe([main], unique_name) as member:
            assert await member.committed(TopicPartition(main, 0)) == 2
    print(
        f"\nmissing DLT: {failures} failed dead-letter publishes, nothing committed; landed {took:.1f} s after creation"
    )


async def settled_group(log: Path, quiet_s: float = 3.0) -> int:
    """Wait until every delivery listener is assigned and no further assignment came for ``quiet_s``
    (each listener's join rebalances the others); the number of "assigned" lines then."""
    listeners = ("delivery-selected", "delivery-group", "delivery-selected-priority")
    await wait_until(
        lambda: all(f"listener {n} member 0: assigned" in log.read_text() for n in listeners), 60, "all assigned"
    )
    deadline = time.monotonic() + 60
    while True:
        count = assigned(log)
        await asyncio.sleep(quiet_s)
        if assigned(log) == count:
            return count
        assert time.monotonic() < deadline, "the consumer group never settled"


def assigned(log: Path) -> int:
    return log.read_text().count(": assigned ")


async def test_a_stopped_database_is_retried_not_dead_lettered_and_nothing_is_lost(
    env: dict[str, str], tmp_path: Path, server_factory: list[Server]
) -> None:
    fast = {
        "BROADCAST_CONSUMERS__SELECTED__MAX_ATTEMPTS": "3",
        "BROADCAST_CONSUMERS__SELECTED__INITIAL_BACKOFF_SECONDS": "0.2",
        "BROADCAST_CONSUMERS__SELECTED__MAX_BACKOFF_SECONDS": "1",
    }
    writer = Server({**env, **fast}, tmp_path, roles="api,relay,scheduler,dlt", name="writer")
    consumer = Server({**env, **fast}, tmp_path, roles="api,consumers", name="consumer")
    server_factory.extend([writer, consumer])
    writer.wait_live()
    consumer.wait_live()
    async with SseClient(consumer.base, "alice") as alice:
        assigned_before = await settled_group(consumer.log)
        consumer.proc.send_signal(signal.SIGSTOP)  # the consumer sees the record only once the database is down
        try:
            async with httpx.AsyncClient(timeout=20) as http:
                response = await http.post(
                    writer.base + "/api/admin/broadcasts",
                    json={"content": "through an outage", "targetType": "SELECTED", "targetIds": ["alice"]},
                    headers=ADMIN,
                )
            assert response.status_code == 201, response.text
            sent = response.json()["id"]
            await asyncio.sleep(1.5)  # the relay publishes it
            await asyncio.to_thread(postgres.stop)
        finally:
            consumer.proc.send_signal(signal.SIGCONT)
        try:
            await wait_until(lambda: consumer.log.read_text().count("transient") >= 5, 60, "five transient retries")
        finally:
            await asyncio.to_thread(postgres.start)
        restarted = time.monotonic()
        [got] = await alice.wait_for(lambda e: e.event == "MESSAGE", timeout_s=60)
        delivered_after = time.monotonic() - restarted
        assert got.data["broadcastId"] == sent
        await asyncio.sleep(2)
        assert [m.data["broadcastId"] for m in alice.messages] == [sent]
    async with httpx.AsyncClient(timeout=20) as http:
        letters = (await http.get(writer.base + "/api/admin/dlt/messages", headers=ADMIN)).json()["items"]
    log = consumer.log.read_text()
    retries = log.count("transient")
    assert letters == [], "a database outage must not dead-letter records"
    assert "recovered (" not in log, "no record was given up (dead-lettered) during the outage"
    assert log.count(": assigned ") == assigned_before, "the outage must not cause a rebalance"
    print(
        f"\ndatabase stopped: {retries} transient retries, 0 dead letters, no rebalance; "
        f"delivered {delivered_after:.1f} s after restart"
    )
