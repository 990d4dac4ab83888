"""The outbox relay dying between the Kafka acknowledgement and the mark (RELIABILITY #7 b), and two relays
racing with random publish delays (#18).

Real ``broadcast-server run`` processes on the real stack. The relay runs in processes of its own
(``--roles relay``), so the only thing the fault touches is the write path from the outbox to Kafka: the app
instance that serves the API, the streams and the consumers lives through the scenario.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import orjson

from broadcast.core import constants, envelope
from devstack.servers import Server
from devstack.stack import StackInfo
from tests.faults.harness import (
    Fleet,
    Publisher,
    alternating,
    base_samples,
    close_all,
    report,
    settled,
    subscribe,
)
from tests.topics import read_to_end

EXIT_AFTER_ACKS = 30
FAILPOINT_LINE = "failpoint testing.relay_exit_after_acks"


def users(count: int) -> list[str]:
    return [f"u{n:03d}" for n in range(count)]


def start_relay(env: dict[str, str], cwd: Path, factory: list[Server], name: str, **overrides: str) -> Server:
    relay = Server({**env, **overrides}, cwd, roles="relay", name=name)
    factory.append(relay)
    relay.wait_live()
    return relay


def delivery_lines(log: Path, broadcast_id: str) -> int:
    """Records of ``broadcast_id`` the app's delivery consumers handled (one JSON log line per record)."""
    count = 0
    for line in log.read_text().splitlines():
        if f'"broadcast_id":"{broadcast_id}"' in line and '"logger":"consumers.delivery"' in line:
            count += orjson.loads(line)["message"].startswith("delivery CREATED")
    return count


async def test_a_relay_killed_between_the_kafka_ack_and_the_mark_resends_and_users_see_it_once(
    env: dict[str, str], tmp_path: Path, server_factory: list[Server], stack: StackInfo
) -> None:
    """relay-a runs with ``BROADCAST_TESTING__RELAY_EXIT_AFTER_ACKS``: after its 30th acknowledged record it
    ends its process with ``os._exit(137)`` after ``publish_many`` returned the acknowledgements and before
    ``UPDATE … published_at``. That immediate exit stands in for a ``kill -9`` landing at that exact moment:
    as with SIGKILL, no ``finally`` runs, the lanes are not released and nothing is flushed or marked. While
    no relay runs the API keeps acknowledging; relay-b (no failpoint) takes the lanes over once relay-a's
    lease ran out and publishes the unmarked rows again. The topic then holds those records twice (read back
    here, so the test proves the dedupe path rather than a lucky miss), the app's consumers handle both copies,
    and every subscriber still shows each broadcast once, in per-user order."""
    fleet = Fleet(env, tmp_path, server_factory)
    app = fleet.start("app", roles="api,consumers,dlt,scheduler")  # everything but the relay
    relay_a = start_relay(
        env, tmp_path, server_factory, "relay-a", BROADCAST_TESTING__RELAY_EXIT_AFTER_ACKS=str(EXIT_AFTER_ACKS)
    )
    people = users(12)
    subs = await subscribe(fleet, people)
    publisher = Publisher(fleet, alternating(people), 0.05).start()
    code = await asyncio.to_thread(relay_a.proc.wait, 60)
    posted_at_exit = publisher.attempted
    await publisher.reached(publisher.attempted + 40)  # the outage: acknowledged, nothing published
    relay_b = await asyncio.to_thread(start_relay, env, tmp_path, server_factory, "relay-b")
    await publisher.reached(publisher.attempted + 40)
    publisher.halt()
    await publisher.finish()
    result = await settled(publisher, subs, 60)
    await close_all(subs)

    prefix = env["BROADCAST_KAFKA__TOPIC_PREFIX"]
    records = []
    for name in constants.BASE_TOPICS:
        records += await read_to_end(stack.kafka_bootstrap, prefix + name)
    events = [envelope.decode(r.value) for r in records]
    copies = Counter(e.event_id for e in events)
    twice = {e.broadcast_id for e in events if copies[e.event_id] > 1}
    acked = {s.id: s for s in publisher.acked}
    handled = {b: delivery_lines(app.log, b) for b in twice}
    shown = {b: sum(b in {s.broadcast_id for s in sub.seen} for sub in subs) for b in twice}
    relay_a_log = relay_a.log.read_text()
    report(
        "relay exit between ack and mark",
        f"relay-a ended itself (exit {code}) after {EXIT_AFTER_ACKS} acknowledged records, before marking the "
        f"last round, {posted_at_exit} posts in; relay-b took over",
        result,
        f"on the topics {len(records)} records for {len(copies)} events, {len(twice)} event(s) twice "
        f"({sorted(acked[b].seq for b in twice if b in acked)}); consumer handled those {sorted(handled.values())} "
        f"times; subscribers showing them {sorted(shown.values())}",
    )
    result.assert_clean()
    assert result.refused == 0, publisher.refused[:3]
    assert code == 137, f"relay-a should have exited through the failpoint:\n{relay_a_log[-2_000:]}"
    assert FAILPOINT_LINE in relay_a_log
    assert relay_b.proc.poll() is None and FAILPOINT_LINE not in relay_b.log.read_text()
    assert twice, "the rows acknowledged before the exit must be on the topic twice (published again by relay-b)"
    assert max(copies.values()) == 2, f"nothing more than one re-send: {copies.most_common(3)}"
    assert {e.broadcast_id for e in events} == acked.keys(), "every acknowledged broadcast is on a topic, no other"
    assert len(copies) == len(acked), "one event per broadcast (one recipient or ALL)"
    assert all(n >= 2 for n in handled.values()), f"the consumers met both copies: {handled}"
    for b in twice:  # and each entitled subscriber shows the twice-published broadcast exactly once
        owed = [sub for sub in subs if acked[b].entitles(sub.user)]
        assert owed and shown[b] == len(owed), (b, shown[b], len(owed))


AGGREGATES = users(100)


def ten_of_the_hundred(seq: int) -> frozenset[str]:
    """Broadcast ``seq`` goes to 10 of the 100 users (an aggregate is a user: the selected topic's key)."""
    return frozenset(random.Random(seq).sample(AGGREGATES, 10))


async def test_two_relays_with_random_publish_delays_keep_each_users_order_in_the_topic_and_at_the_client(
    env: dict[str, str], tmp_path: Path, server_factory: list[Server], stack: StackInfo
) -> None:
    """RELIABILITY #18: two instances, each with a relay that waits a random 0-40 ms before every publish
    (``BROADCAST_TESTING__RELAY_PUBLISH_DELAY_MS``), race for the outbox's lanes while 1,000 broadcasts to 10
    of 100 users each (10,000 rows) are posted back to back. Read back to its end, the selected topic holds
    each row once, and each user's events in the order their broadcasts were created; each user's stream
    shows them once, in that order."""
    delays = {"BROADCAST_TESTING__RELAY_PUBLISH_DELAY_MS": "40"}
    fleet = Fleet(env, tmp_path, server_factory)
    for name in ("app-a", "app-b"):
        fleet.start(name, **delays)
    subs = await subscribe(fleet, AGGREGATES)
    publisher = Publisher(fleet, ten_of_the_hundred, 0.0).start(1_000)
    await publisher.finish(600)
    result = await settled(publisher, subs, 120)
    await close_all(subs)

    records = await read_to_end(stack.kafka_bootstrap, env["BROADCAST_KAFKA__TOPIC_PREFIX"] + constants.SELECTED_TOPIC)
    seq_of = {s.id: s.seq for s in publisher.acked}
    copies = Counter(envelope.decode(r.value).event_id for r in records)
    per_user: dict[str, list[int]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        event = envelope.decode(r.value)
        per_user.setdefault(event.user_id or "", []).append(seq_of[event.broadcast_id])
    unordered = [user for user, seqs in per_user.items() if seqs != sorted(seqs)]
    produced = {
        name: sum(v for _, v in await base_samples(server.base, "broadcast_events_produced_total"))
        for name, server in fleet.servers.items()
    }
    report(
        "two relays, random publish delays",
        "1,000 broadcasts x 10 of 100 users; each relay waits 0-40 ms before every publish",
        result,
        f"on the topic {len(records)} records for {len(copies)} events; records per relay {produced}; "
        f"users whose topic order differs from creation order {len(unordered)}",
    )
    result.assert_clean()
    assert result.refused == 0 and result.acked == 1_000, publisher.refused[:3]
    assert len(copies) == 10_000 and max(copies.values()) == 1, f"each row once: {copies.most_common(3)}"
    assert not unordered, f"per-key order broken in the topic for {unordered[:5]}"
    assert all(n > 0 for n in produced.values()), f"both relays had lanes: {produced}"
