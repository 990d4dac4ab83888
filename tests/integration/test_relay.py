"""The outbox relay on real Kafka and PostgreSQL: topics, keys, partitions, order, crashes, concurrency."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from sqlalchemy import func, select

from broadcast.adapters.sql.stores import append_outbox
from broadcast.adapters.sql.tables import user_broadcast_messages
from broadcast.core import constants, envelope
from broadcast.core.domain import BroadcastStatus, EventType, NewBroadcast, OutboxEvent, TargetType, User
from broadcast.outbox.relay import OutboxRelay
from devstack.stack import StackInfo, kill_kafka_node, start_kafka_node
from tests.integration.conftest import Pipeline
from tests.topics import default_partition, read_to_end, read_topic


async def test_created_events_land_on_the_right_topics_keys_and_partitions(
    pipeline: Pipeline, stack: StackInfo
) -> None:
    await pipeline.users.upsert([User("alice", roles=frozenset({"ops"})), User("bob"), User("carol")])
    selected, _ = await pipeline.lifecycle.create(
        NewBroadcast("hello", TargetType.SELECTED, ("alice", "bob", "dave")), sender_id="admin", correlation_id="c-1"
    )
    to_all, _ = await pipeline.lifecycle.create(NewBroadcast("all", TargetType.ALL), sender_id="admin")
    to_ops, _ = await pipeline.lifecycle.create(NewBroadcast("ops", TargetType.ROLE, ("ops",)), sender_id="admin")
    assert (to_all.targeted_count, to_ops.targeted_count) == (3, 1)
    assert await pipeline.publish_all() == 5

    records = await read_topic(stack.kafka_bootstrap, pipeline.topic(constants.SELECTED_TOPIC), 3)
    assert sorted(r.key or b"" for r in records) == [b"alice", b"bob", b"dave"]
    for r in records:
        assert r.partition == default_partition(r.key or b"")
        event = envelope.decode(r.value)
        assert (event.event_type, event.broadcast_id) == (EventType.CREATED, selected.id)
        assert event.user_id is not None and event.user_id.encode() == r.key
        assert event.event_id == f"{selected.id}.CREATED.{event.user_id}"
        assert event.broadcast is not None and event.broadcast.content == "hello"
        assert dict(r.headers)[constants.HEADER_CORRELATION_ID] == b"c-1"
        assert dict(r.headers)[constants.HEADER_EVENT_TYPE] == b"CREATED"

    group = await read_topic(stack.kafka_bootstrap, pipeline.topic(constants.GROUP_TOPIC), 2)
    assert sorted(r.key or b"" for r in group) == sorted([to_all.id.encode(), to_ops.id.encode()])
    for r in group:
        assert r.partition == default_partition(r.key or b"")
        event = envelope.decode(r.value)
        assert event.user_id is None and event.broadcast is not None
    ops_event = envelope.decode(next(r.value for r in group if r.key == to_ops.id.encode()))
    assert ops_event.broadcast is not None and ops_event.broadcast.target_roles == ("ops",)


async def test_one_users_events_keep_their_creation_order(pipeline: Pipeline, stack: StackInfo) -> None:
    ids = []
    for n in range(8):
        b, _ = await pipeline.lifecycle.create(
            NewBroadcast(f"m{n}", TargetType.SELECTED, ("alice", f"other-{n}")), sender_id="admin"
        )
        ids.append(b.id)
    await pipeline.publish_all()
    records = await read_topic(stack.kafka_bootstrap, pipeline.topic(constants.SELECTED_TOPIC), 16)
    alice = sorted((r for r in records if r.key == b"alice"), key=lambda r: r.offset)
    assert [envelope.decode(r.value).broadcast_id for r in alice] == ids


async def test_a_transaction_that_commits_late_is_still_published(pipeline: Pipeline, stack: StackInfo) -> None:
    topic = pipeline.topic(constants.SELECTED_TOPIC)

    def row(key: str) -> OutboxEvent:
        return OutboxEvent(topic, key, EventType.READ, orjson.dumps({"k": key}))

    async with pipeline.engine.connect() as late:
        transaction = await late.begin()
        [late_id] = await append_outbox(late, [row("late")])  # opened first, lower id
        [early_id] = await pipeline.outbox.append([row("early")])  # committed first, higher id
        assert late_id < early_id
        assert await pipeline.publish_all() == 1
        await transaction.commit()
    assert await pipeline.publish_all() == 1
    records = await read_topic(stack.kafka_bootstrap, topic, 2)
    assert sorted(r.key or b"" for r in records) == [b"early", b"late"]


async def test_two_relays_at_once_publish_every_row(pipeline: Pipeline, stack: StackInfo) -> None:
    recipients = tuple(f"user-{n}" for n in range(3_000))
    await pipeline.lifecycle.create(NewBroadcast("x", TargetType.SELECTED, recipients[:1_500]), sender_id="a")
    await pipeline.lifecycle.create(NewBroadcast("y", TargetType.SELECTED, recipients[1_500:]), sender_id="a")
    one, two = pipeline.relay("relay-one"), pipeline.relay("relay-two")
    deadline = time.monotonic() + 60
    while await pipeline.outbox.backlog():
        assert time.monotonic() < deadline
        await asyncio.gather(one.run_once(), two.run_once())
    assert one.published > 0 and two.published > 0, "both relays should have had lanes"
    assert one.published + two.published == 3_000
    records = await read_topic(stack.kafka_bootstrap, pipeline.topic(constants.SELECTED_TOPIC), 3_000)
    assert len(records) == 3_000
    assert {r.key.decode() for r in records if r.key} == set(recipients)


def _relay_process(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "broadcast", "run", "--roles", "relay", "--port", "0"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("BROADCAST_")}, **env},
        cwd=cwd,
        stdout=(cwd / f"relay-{time.monotonic_ns()}.log").open("w"),
        stderr=subprocess.STDOUT,
    )


async def test_a_relay_killed_mid_broadcast_loses_nothing_after_restart(
    pipeline: Pipeline, stack: StackInfo, tmp_path: Path
) -> None:
    recipients = tuple(f"user-{n}" for n in range(10_000))
    broadcast, _ = await pipeline.lifecycle.create(
        NewBroadcast("big", TargetType.SELECTED), sender_id="admin", recipients=recipients
    )
    env = {**pipeline.env(stack), "BROADCAST_RELAY__BATCH_SIZE": "100", "BROADCAST_RELAY__LANES_PER_CLAIM": "1"}
    relay = _relay_process(env, tmp_path)
    try:
        deadline = time.monotonic() + 90
        while (backlog := await pipeline.outbox.backlog()) > 8_000:
            assert relay.poll() is None, "relay exited early"
            assert time.monotonic() < deadline, "relay made no progress"
            await asyncio.sleep(0.02)
        relay.send_signal(signal.SIGKILL)
        relay.wait(timeout=10)
    finally:
        if relay.poll() is None:
            relay.kill()
    left = await pipeline.outbox.backlog()
    assert 0 < left < 10_000, f"the kill should land mid-broadcast (backlog {backlog} → {left})"

    restarted = _relay_process(pipeline.env(stack), tmp_path)
    try:
        deadline = time.monotonic() + 90
        while await pipeline.outbox.backlog():
            assert restarted.poll() is None, "restarted relay exited"
            assert time.monotonic() < deadline, "restarted relay did not drain the outbox"
            await asyncio.sleep(0.1)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=30) == 0

    records = await read_topic(stack.kafka_bootstrap, pipeline.topic(constants.SELECTED_TOPIC), 10_000)
    per_user = Counter(r.key.decode() for r in records if r.key)
    assert set(per_user) == set(recipients), "every recipient's event is on the topic"
    assert len(records) - len(per_user) < 1_000, "re-sends are bounded by what was in flight"
    stored = await pipeline.broadcasts.get(broadcast.id)
    assert stored is not None and stored.status is BroadcastStatus.ACTIVE and stored.targeted_count == 10_000
    async with pipeline.engine.connect() as conn:
        rows = await conn.execute(
            select(func.count())
            .select_from(user_broadcast_messages)
            .where(
                user_broadcast_messages.c.broadcast_id == broadcast.id,
                user_broadcast_messages.c.delivery_status == "PENDING",
            )
        )
        assert rows.scalar_one() == 10_000


async def test_a_record_kafka_refuses_for_good_leaves_its_lane_and_nothing_is_published_twice(
    pipeline: Pipeline, stack: StackInfo
) -> None:
    """A row over the topic's max.message.bytes: before, its lane stalled and the rows behind it were published
    again every round. Now it fails alone, moves to the dead state, and every other row is published once."""
    topic = pipeline.topic(constants.SELECTED_TOPIC)
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": "4096"})]
        )
    finally:
        await admin.close()
    await asyncio.sleep(1)  # the brokers apply the topic's new limit

    def row(key: str, value: bytes) -> OutboxEvent:
        return OutboxEvent(topic, key, EventType.CREATED, value)

    rows = [row("alice", b"a0"), row("alice", b"x" * 10_000), row("alice", b"a2"), row("bob", b"b0")]
    rows += [row("alice", f"a{n}".encode()) for n in range(3, 40)]
    async with pipeline.engine.begin() as conn:
        await append_outbox(conn, rows)
    published = await pipeline.publish_all()

    assert await pipeline.outbox.backlog() == 0
    [dead] = await pipeline.outbox.dead(10)
    assert dead.event.payload == b"x" * 10_000 and "TooLarge" in (dead.last_error or ""), dead.last_error
    records = await read_topic(stack.kafka_bootstrap, topic, len(rows) - 1)
    values = [r.value for r in records if r.key == b"alice"]
    assert Counter(values).most_common(1)[0][1] == 1, "no record published twice"
    assert values == [b"a0", b"a2", *[f"a{n}".encode() for n in range(3, 40)]], "alice's order kept"
    assert published == len(rows) - 1


async def test_a_broker_restarted_during_a_relay_batch_leaves_no_duplicate_in_one_producer_session(
    pipeline: Pipeline, stack: StackInfo
) -> None:
    """RELIABILITY #7 (a): one relay (one idempotent producer session) drains a 10,000-recipient broadcast in
    rounds of 200 rows; a broker is SIGKILLed mid-drain and started again 5 s later. The producer's own retries
    are deduplicated by the brokers (sequence numbers), and the relay sends a row again only when its round
    failed: read back to the end, the topic holds every recipient's event exactly once."""
    recipients = tuple(f"user-{n:05d}" for n in range(10_000))
    broadcast, _ = await pipeline.lifecycle.create(
        NewBroadcast("batch", TargetType.SELECTED), sender_id="admin", recipients=recipients
    )
    small_rounds = pipeline.settings.relay.model_copy(update={"batch_size": 100, "lanes_per_claim": 2})
    relay = OutboxRelay(pipeline.outbox, pipeline.log, small_rounds, "relay-7a")
    victim, rounds_during_outage = 2, 0
    deadline = time.monotonic() + 180
    try:
        while await pipeline.outbox.backlog() > 8_000:
            assert time.monotonic() < deadline, "the relay made no progress"
            await relay.run_once()
        kill_kafka_node(victim)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 5 and await pipeline.outbox.backlog():
            await relay.run_once()  # publishing goes on with two of three brokers
            rounds_during_outage += 1
    finally:
        await asyncio.to_thread(start_kafka_node, victim)
    while await pipeline.outbox.backlog():
        assert time.monotonic() < deadline, f"backlog {await pipeline.outbox.backlog()} left"
        if not await relay.run_once():
            await asyncio.sleep(0.05)

    assert rounds_during_outage > 0, "the broker was down while rows were being published"
    assert pipeline.log.producer_renewals == 0, "one producer session throughout"
    records = await read_to_end(stack.kafka_bootstrap, pipeline.topic(constants.SELECTED_TOPIC), 60)
    event_ids = Counter(envelope.decode(r.value).event_id for r in records)
    assert len(event_ids) == 10_000, "every recipient's event is on the topic"
    twice = [(event_id, n) for event_id, n in event_ids.items() if n > 1]
    assert not twice, f"{len(twice)} events published more than once, e.g. {twice[:5]}"
    assert {envelope.decode(r.value).user_id for r in records} == set(recipients)
    assert (await pipeline.broadcasts.get(broadcast.id)) is not None
    print(
        f"\nbroker {victim} SIGKILLed mid-drain for 5 s: {rounds_during_outage} relay rounds meanwhile, "
        f"{len(records)} records for {len(event_ids)} events, producer sessions replaced: 0"
    )
