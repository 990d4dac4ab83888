"""Kafka ACLs and credentials under faults (RELIABILITY #15, #21, #38 e): real server processes on the
SCRAM listener.

The local cluster runs Kafka's ``StandardAuthorizer``: on a topic with no ACL every principal may do
anything, so each test puts ACLs on topics of its own only (``tests.kafka_acls``) and removes them after.
The app connects as the stack's SCRAM user ``app``; a topic with ACLs for ``app`` that leave one operation
out is that operation denied, as when an operator forgot (or revoked) one ACL.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from broadcast.core import constants, envelope
from devstack.servers import Server, isolated_env
from devstack.stack import StackInfo, set_scram_user
from tests.auth import bearer
from tests.faults.harness import Fleet, Publisher, alternating, base_samples, close_all, report, settled, subscribe
from tests.kafka_acls import ALL, DESCRIBE, READ, WRITE, allow_again, grant
from tests.servers import fast_retries, scram_env
from tests.sse_client import SseClient
from tests.topics import read_to_end
from tests.waiting import wait_until

ADMIN = bearer("admin", "admin")
APP = "User:app"


@asynccontextmanager
async def restricted(bootstrap: str, topics: list[str], *operations: int) -> AsyncIterator[None]:
    """``topics`` allow ``app`` only ``operations`` while the block runs; every ACL on them is gone after."""
    try:
        for topic in topics:
            await grant(bootstrap, topic, APP, *operations)
        yield
    finally:
        for topic in topics:
            await allow_again(bootstrap, topic)


async def metric(base: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for found, v in await base_samples(base, name) if labels.items() <= found.items())


async def post(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await http.post("/api/admin/broadcasts", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def to(user: str, content: str) -> dict[str, Any]:
    return {"content": content, "targetType": "SELECTED", "targetIds": [user]}


async def test_a_dlt_the_app_may_not_write_keeps_the_failed_record_uncommitted_until_the_acl_is_granted(
    stack: StackInfo, unique_name: str, tmp_path: Path, server_factory: list[Server]
) -> None:
    """#15, the ACL variant: the selected topic's DLT lets ``app`` read and describe it but not write. A
    broadcast the fault drill fails goes to the recoverer, whose dead-letter publish is refused
    (TopicAuthorizationFailed): the record is retried, not skipped, so the record behind it on the same
    partition (same user) is not handled; the failures are exported (``broadcast_produce_errors_total`` on
    the DLT, the ``BroadcastDeadLetterPublishFailing`` alert's series). Once the Write ACL is back, the dead
    letter lands and the next record is delivered."""
    variables = isolated_env(
        stack,
        unique_name,
        tmp_path,
        **scram_env(stack, stack.scram_password),
        **fast_retries(1),
        BROADCAST_TESTING__FAULT_DRILL_ENABLED="true",
    )
    dlt = variables["BROADCAST_KAFKA__TOPIC_PREFIX"] + constants.dlt_topic(constants.SELECTED_TOPIC)
    async with restricted(stack.kafka_bootstrap, [dlt], READ, DESCRIBE):
        server = Fleet(variables, tmp_path, server_factory).start("app")
        async with httpx.AsyncClient(base_url=server.base, headers=ADMIN, timeout=20) as http:
            armed = await http.post("/api/admin/testing/kafka-consumer-failure", json={})
            assert armed.status_code == 201, armed.text
            failed = await post(http, to("alice", "the drill fails this one"))
            behind = await post(http, to("alice", "same partition, behind it"))
            await wait_until(
                lambda: server.log.read_text().count("could not be recovered") >= 3, 90, "three refused DLT publishes"
            )
            log = server.log.read_text()
            assert "TopicAuthorizationFailed" in log
            assert f"delivery CREATED {behind}" not in log, "nothing behind the record may be handled meanwhile"
            refused = await metric(server.base, "broadcast_produce_errors_total", topic=dlt)
            letters = (await http.get("/api/admin/dlt/messages", params={"broadcastId": failed})).json()["items"]
            assert letters == [] and refused >= 3, (letters, refused)
    # the ACLs are gone: ``app`` may write the DLT again
    took = await wait_until(lambda: f"delivery CREATED {behind}" in server.log.read_text(), 60, "the next record")
    async with httpx.AsyncClient(base_url=server.base, headers=ADMIN, timeout=20) as http:
        [letter] = (await http.get("/api/admin/dlt/messages", params={"broadcastId": failed})).json()["items"]
    assert letter["exceptionFqcn"] == "dlt.drill.FaultDrillError" and letter["userId"] == "alice"
    async with SseClient(server.base, "alice") as alice:
        [got] = await alice.wait_for(lambda e: e.event == "MESSAGE", timeout_s=30)
        assert got.data["broadcastId"] == behind
    print(
        f"\nDLT without a Write ACL: {refused:.0f} refused dead-letter publishes, the next record waited; "
        f"delivered {took:.1f} s after the ACL came back"
    )


async def test_a_topic_the_relay_may_not_write_sends_its_rows_to_the_dead_state_and_other_keys_flow(
    stack: StackInfo, unique_name: str, tmp_path: Path, server_factory: list[Server]
) -> None:
    """#21, the ACL variant: the group topic lets ``app`` read and describe it, not write. An ALL broadcast's
    row is refused (TopicAuthorizationFailed, a refusal of the record itself) ``poison_attempts`` times,
    then moves to the outbox's dead state (``broadcast_outbox_dead``, the ``BroadcastOutboxDead`` alert);
    the SELECTED broadcasts posted after it reach their user, in order, each published once. With the ACL
    back, an admin's redrive delivers the ALL broadcast."""
    variables = isolated_env(
        stack,
        unique_name,
        tmp_path,
        **scram_env(stack, stack.scram_password),
        BROADCAST_OBSERVABILITY__SAMPLE_SECONDS="1",
    )
    prefix = variables["BROADCAST_KAFKA__TOPIC_PREFIX"]
    group_topic = prefix + constants.GROUP_TOPIC
    server = Fleet(variables, tmp_path, server_factory).start("app")
    async with (
        httpx.AsyncClient(base_url=server.base, headers=ADMIN, timeout=20) as http,
        SseClient(server.base, "alice") as alice,
    ):
        async with restricted(stack.kafka_bootstrap, [group_topic], READ, DESCRIBE):
            everyone = await post(http, {"content": "to all", "targetType": "ALL"})
            selected = [await post(http, to("alice", f"m{n}")) for n in range(5)]
            got = await alice.wait_for(lambda e: e.event == "MESSAGE", timeout_s=60, count=5)
            assert [e.data["broadcastId"] for e in got] == selected, "the other keys flow, in order"

            async def dead_rows() -> list[dict[str, Any]]:
                return list((await http.get("/api/admin/outbox/dead")).json()["items"])

            deadline = time.monotonic() + 60
            while not (dead := await dead_rows()):
                assert time.monotonic() < deadline, "the refused row never reached the dead state"
                await asyncio.sleep(0.5)
            [row] = dead
            assert row["broadcastId"] == everyone and row["topic"] == group_topic, row
            assert "TopicAuthorizationFailed" in row["lastError"] and row["attempts"] == 3, row
            await wait_until_metric(server.base, "broadcast_outbox_dead", 1.0)
        redriven = await http.post(f"/api/admin/outbox/dead/{row['id']}/redrive")
        assert redriven.status_code == 200, redriven.text
        await alice.wait_for(lambda e: e.event == "MESSAGE" and e.data["broadcastId"] == everyone, timeout_s=60)
        assert [e.data["broadcastId"] for e in alice.messages] == [*selected, everyone]
    selected_records = await read_to_end(stack.kafka_bootstrap, prefix + constants.SELECTED_TOPIC)
    group_records = await read_to_end(stack.kafka_bootstrap, group_topic)
    copies = Counter(envelope.decode(r.value).event_id for r in [*selected_records, *group_records])
    assert len(copies) == 6 and max(copies.values()) == 1, copies
    print(f"\ngroup topic without a Write ACL: its row dead after {row['attempts']} refusals, 5 others delivered")


async def wait_until_metric(base: str, name: str, at_least: float, timeout_s: float = 30.0) -> float:
    deadline = time.monotonic() + timeout_s
    while (value := await metric(base, name)) < at_least:
        assert time.monotonic() < deadline, f"{name} stayed at {value} (expected at least {at_least})"
        await asyncio.sleep(0.5)
    return value


async def test_a_principal_without_acls_is_refused_at_start_with_a_clear_error_and_no_secret(
    stack: StackInfo, unique_name: str, tmp_path: Path
) -> None:
    """#38 (e), a principal missing its ACLs: ``nobody`` authenticates, but the app's topics allow only
    ``app``. ``run`` fails closed: it exits non-zero within a minute, says the topics are not visible to
    it and to grant the ACLs, and never prints the password."""
    variables = isolated_env(stack, unique_name, tmp_path)  # topics created over the plaintext (super user) port
    topics = [variables["BROADCAST_KAFKA__TOPIC_PREFIX"] + t for t in constants.ALL_TOPICS]
    nobody, password = f"nobody-{unique_name}", secrets.token_hex(16)
    await asyncio.to_thread(set_scram_user, nobody, password)
    try:
        async with restricted(stack.kafka_bootstrap, topics, ALL):
            started = time.monotonic()
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "broadcast", "run", "--port", "0"],
                env={**variables, **scram_env(stack, password, nobody)},
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=180,
            )
            elapsed = time.monotonic() - started
    finally:
        await asyncio.to_thread(set_scram_user, nobody, None)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s to give up"
    assert "refusing to start" in output and "Describe ACL" in output, output[-3000:]
    assert password not in output
    print(f"\nprincipal without ACLs: refused in {elapsed:.1f} s (exit {done.returncode})")


async def test_a_read_acl_revoked_while_running_stops_delivery_without_spinning_and_loses_nothing(
    stack: StackInfo, unique_name: str, tmp_path: Path, server_factory: list[Server]
) -> None:
    """#38 (e) at run time: ``app`` loses Read on the selected topic while broadcasts keep coming. The relay
    still publishes them (Write); the consumer cannot fetch: it retries once a second, readiness turns 503
    once that lasted ``consumer_stall_seconds`` (10 s here, 120 s by default), and the process does not spin
    (CPU time over 10 s well under one core). Bob, connected throughout, still gets them (his PENDING rows
    are reconciled), once and in order; once Read is granted again the consumer handles each record."""
    variables = isolated_env(
        stack,
        unique_name,
        tmp_path,
        **scram_env(stack, stack.scram_password),
        BROADCAST_OBSERVABILITY__CONSUMER_STALL_SECONDS="10",
    )
    selected_topic = variables["BROADCAST_KAFKA__TOPIC_PREFIX"] + constants.SELECTED_TOPIC
    server = Fleet(variables, tmp_path, server_factory).start("app")
    async with (
        httpx.AsyncClient(base_url=server.base, headers=ADMIN, timeout=20) as http,
        SseClient(server.base, "bob") as bob,
    ):
        first = await post(http, to("bob", "before"))
        await bob.wait_for(lambda e: e.event == "MESSAGE", timeout_s=60)
        async with restricted(stack.kafka_bootstrap, [selected_topic], WRITE, DESCRIBE):
            during = [await post(http, to("bob", f"during {n}")) for n in range(5)]
            ready = await wait_for_status(server.base, 503, 90)
            cpu = await cpu_seconds(server, 10.0)
            assert cpu < 5.0, f"{cpu:.1f} CPU seconds in 10 s while denied"
            log = server.log.read_text()
            assert not [b for b in during if f"delivery CREATED {b}" in log], "nothing consumed while denied"
        await wait_for_status(server.base, 200, 90)
        took = await wait_until(
            lambda: all(f"delivery CREATED {b}" in server.log.read_text() for b in during), 60, "consumed again"
        )
        await bob.wait_for(lambda e: e.event == "MESSAGE", timeout_s=60, count=6)
        await asyncio.sleep(2)
        assert [e.data["broadcastId"] for e in bob.messages] == [first, *during]
    print(
        f"\nRead ACL revoked: readiness {ready!r}, {cpu:.2f} CPU s in 10 s; consumed again {took:.1f} s after "
        "the grant; bob got each broadcast once, in order"
    )


async def wait_for_status(base: str, status: int, timeout_s: float) -> str:
    """Poll /health/ready until it answers ``status``; its body then."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            response = await http.get(base + "/health/ready")
            if response.status_code == status:
                return response.text[:300]
            assert time.monotonic() < deadline, f"readiness stayed {response.status_code}: {response.text[:300]}"
            await asyncio.sleep(0.5)


async def cpu_seconds(server: Server, window_s: float) -> float:
    """CPU time (user + system) the server process used during the next ``window_s`` seconds."""

    def used() -> float:
        fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ = 100)

    before = used()
    await asyncio.sleep(window_s)
    return used() - before


async def test_a_scram_credential_rotated_under_traffic_loses_nothing(
    stack: StackInfo, unique_name: str, tmp_path: Path, server_factory: list[Server]
) -> None:
    """#38 (e), rotation: two instances run as ``svc-a`` while broadcasts flow. The operator adds ``svc-b``,
    restarts the instances one at a time with it (each out of rotation first, SIGTERM), then deletes
    ``svc-a``. Nothing is lost or shown twice, the API never refuses, ``svc-a`` no longer authenticates,
    and no password is in any log."""
    old, new = (f"svc-a-{unique_name}", secrets.token_hex(16)), (f"svc-b-{unique_name}", secrets.token_hex(16))
    await asyncio.to_thread(set_scram_user, *old)
    try:
        variables = isolated_env(stack, unique_name, tmp_path, **scram_env(stack, old[1], old[0]))
        fleet = Fleet.of(variables, tmp_path, server_factory, "app-a", "app-b")
        people = [f"u{n:02d}" for n in range(12)]
        subs = await subscribe(fleet, people)
        publisher = Publisher(fleet, alternating(people), 0.05).start()
        await publisher.reached(40)
        await asyncio.to_thread(set_scram_user, *new)
        fleet.env = {**variables, **scram_env(stack, new[1], new[0])}
        for instance in ("app-a", "app-b"):
            assert await asyncio.to_thread(fleet.retire, instance) == 0
            await asyncio.to_thread(fleet.start, f"{instance}2")
            await publisher.reached(publisher.attempted + 30)
        await asyncio.to_thread(set_scram_user, old[0], None)
        await publisher.reached(publisher.attempted + 40)
        publisher.halt()
        await publisher.finish()
        result = await settled(publisher, subs, 60)
        await close_all(subs)
        refused_old, accepted_new = await scram_refused(stack, *old), await scram_refused(stack, *new)
    finally:
        await asyncio.to_thread(set_scram_user, old[0], None)
        await asyncio.to_thread(set_scram_user, new[0], None)
    logs = "".join(server.log.read_text() for server in fleet.factory)
    report(
        "SCRAM rotation",
        "svc-b added, both instances restarted one at a time with it, svc-a deleted, while broadcasts flowed",
        result,
        f"a new client as svc-a after its deletion: {refused_old}; as svc-b: {accepted_new}",
    )
    result.assert_clean()
    assert result.refused == 0, publisher.refused[:3]
    assert accepted_new == "ok" and refused_old != "ok", (accepted_new, refused_old)
    assert old[1] not in logs and new[1] not in logs


async def scram_refused(stack: StackInfo, user: str, password: str) -> str:
    """How the cluster answers a new client as ``user`` with ``password``: "ok" if it is let in, else the
    client's error (aiokafka logs the SASL refusal of each broker, then fails to bootstrap)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.kafka_scram_bootstrap,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username=user,
        sasl_plain_password=password,
    )
    try:
        await asyncio.wait_for(producer.start(), 30)
    except (KafkaError, TimeoutError) as exc:
        return repr(exc)
    finally:
        await producer.stop()
    return "ok"
