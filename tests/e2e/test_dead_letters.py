"""Dead letters end to end: real server processes on the real stack (3 brokers, PostgreSQL, Redis).

Poison records produced straight onto the selected topic, the fault drill, redrive and purge, checked the
way an operator would: through the admin API, an SSE client, and an independent Kafka client (``kcat``).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import itertools
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from broadcast.core import constants
from devstack.servers import Server, isolated_env
from devstack.stack import StackInfo
from devstack.tools import require
from tests.auth import bearer
from tests.servers import fast_retries
from tests.sse_client import SseClient
from tests.topics import default_partition, read_to_end, read_topic

ADMIN = bearer("admin", "admin")
DLT = "/api/admin/dlt"
ROUNDS = 3  # redrives of a record that still fails
MAX_REQUEST_SIZE = inspect.signature(AIOKafkaProducer).parameters["max_request_size"].default  # the app's producer
SPRING_HEADERS = {
    constants.DLT_EXCEPTION_FQCN,
    constants.DLT_EXCEPTION_MESSAGE,
    constants.DLT_EXCEPTION_STACKTRACE,
    constants.DLT_ORIGINAL_TOPIC,
    constants.DLT_ORIGINAL_PARTITION,
    constants.DLT_ORIGINAL_OFFSET,
    constants.DLT_ORIGINAL_TIMESTAMP,
    constants.DLT_ORIGINAL_TIMESTAMP_TYPE,
    constants.DLT_ORIGINAL_CONSUMER_GROUP,
}


@pytest.fixture
def env(stack: StackInfo, unique_name: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    fast = fast_retries(3)
    yield isolated_env(stack, unique_name, tmp_path, BROADCAST_TESTING__FAULT_DRILL_ENABLED="true", **fast)


def topic(env: dict[str, str], name: str) -> str:
    return env["BROADCAST_KAFKA__TOPIC_PREFIX"] + name


async def api(method: str, url: str, body: Any = None, status: int = 200) -> Any:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.request(method, url, json=body, headers=ADMIN)
    assert response.status_code == status, response.text
    return response.json()


async def dead_letters(base: str, expected: int, query: str = "", timeout_s: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        items: list[dict[str, Any]] = (await api("GET", f"{base}{DLT}/messages?limit=100{query}"))["items"]
        if len(items) >= expected or time.monotonic() > deadline:
            assert len(items) == expected, items
            return items
        await asyncio.sleep(0.25)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kcat_records(bootstrap: str, name: str) -> list[dict[str, Any]]:
    """The topic read by an independent client: Debian's kcat, JSON output."""
    done = subprocess.run(
        [require("kcat"), "-b", bootstrap.split(",")[0], "-C", "-t", name, "-J", "-e", "-o", "beginning", "-q"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    # kcat writes header and payload bytes as they are (control characters as \\u escapes): latin-1 keeps them
    return [json.loads(line) for line in done.stdout.decode("latin-1").splitlines() if line.strip()]


async def test_malformed_records_go_to_the_dlt_after_one_attempt_and_the_partition_keeps_flowing(
    server: Server, env: dict[str, str], stack: StackInfo
) -> None:
    selected = topic(env, constants.SELECTED_TOPIC)
    poison = [b"{not json", b"\xff\xfe\x00 not utf-8", orjson.dumps({"v": 1, "eventType": "CREATED"})]
    async with SseClient(server.base, "alice") as alice:
        producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
        await producer.start()
        try:
            for n, value in enumerate(poison):
                await producer.send_and_wait(selected, value, key=b"alice", headers=[("trace-id", f"t{n}".encode())])
        finally:
            await producer.stop()
        sent = await api(
            "POST",
            server.base + "/api/admin/broadcasts",
            {"content": "after", "targetType": "SELECTED", "targetIds": ["alice"]},
            201,
        )
        [got] = await alice.wait_for(lambda e: e.event == "MESSAGE", timeout_s=30)
        assert got.data["broadcastId"] == sent["id"]  # same key, same partition: it flowed past the poison
        items = await dead_letters(server.base, 3)
        cpu_before = cpu_seconds(server.proc.pid)
        await asyncio.sleep(3)
        cpu_idle = cpu_seconds(server.proc.pid) - cpu_before
    partition = default_partition(b"alice")
    by_offset = sorted(items, key=lambda x: x["originalOffset"])
    for n, (item, value) in enumerate(zip(by_offset, poison, strict=True)):
        assert item["exceptionFqcn"] == "broadcast.errors.ValidationError"
        assert (item["originalTopic"], item["originalPartition"], item["dltPartition"]) == (
            selected,
            partition,
            partition,
        )
        detail = await api("GET", f"{server.base}{DLT}/messages/{item['id']}")
        assert base64.b64decode(detail["payload"]["base64"]) == value
        assert "Traceback" in detail["stacktrace"]
        headers = {h["key"]: h for h in detail["headers"]}
        assert set(headers) >= SPRING_HEADERS
        assert headers[constants.DLT_ORIGINAL_OFFSET]["int"] == item["originalOffset"]
        assert headers["trace-id"]["text"] == f"t{n}"  # the original headers are kept
    summary = await api("GET", f"{server.base}{DLT}/summary?topic={constants.SELECTED_TOPIC}")
    assert summary["groups"] == [
        {
            "originalTopic": selected,
            "exceptionFqcn": "broadcast.errors.ValidationError",
            "count": 3,
            "newest": summary["groups"][0]["newest"],
        }
    ]

    log = server.log.read_text()
    assert log.count("recovered (not retryable)") == 3, "each poison record is handled exactly once"
    assert "retrying in" not in log, "not-retryable records are never retried"
    assert cpu_idle < 1.5, f"the server spins after dead-lettering: {cpu_idle:.2f} s CPU in 3 s"

    # an independent client reads the same headers, with Spring's encodings
    read = kcat_records(stack.kafka_bootstrap, topic(env, constants.SELECTED_DLT_TOPIC))
    assert len(read) == 3
    for record, value in zip(sorted(read, key=lambda r: r["offset"]), poison, strict=True):
        names, values = record["headers"][0::2], record["headers"][1::2]
        headers = dict(zip(names, (v.encode("latin-1") for v in values), strict=True))
        assert set(headers) >= SPRING_HEADERS and "trace-id" in headers
        assert headers[constants.DLT_ORIGINAL_TOPIC] == selected.encode()
        assert int.from_bytes(headers[constants.DLT_ORIGINAL_PARTITION], "big") == partition == record["partition"]
        assert headers[constants.DLT_ORIGINAL_TIMESTAMP_TYPE] == b"CreateTime"
        assert headers[constants.DLT_ORIGINAL_CONSUMER_GROUP] == env["BROADCAST_KAFKA__CONSUMER_GROUP"].encode()
        assert headers[constants.DLT_EXCEPTION_FQCN] == b"broadcast.errors.ValidationError"
        assert record["key"] == "alice" and record["payload"].encode("latin-1") == value
    print(f"\nmalformed records: 3 dead-lettered after 1 attempt each; idle CPU afterwards {cpu_idle:.2f} s in 3 s")


async def test_a_drilled_broadcast_lands_in_the_dlt_and_a_redrive_delivers_it_exactly_once(server: Server) -> None:
    base = server.base
    drill = await api("POST", base + "/api/admin/testing/kafka-consumer-failure", {"expiresInSeconds": 120}, 201)
    assert drill["scope"] == "next broadcast"
    assert [d["id"] for d in (await api("GET", base + "/api/admin/testing/kafka-consumer-failure"))["armed"]] == [
        drill["id"]
    ]
    # alice is offline: the consumer is the only path (a connected user's PENDING row would also be sent
    # by reconciliation, which is how a SELECTED message reaches an online user despite a failing consumer)
    sent = await api(
        "POST",
        base + "/api/admin/broadcasts",
        {"content": "drilled", "targetType": "SELECTED", "targetIds": ["alice"]},
        201,
    )
    [letter] = await dead_letters(base, 1, f"&broadcastId={sent['id']}")
    assert letter["exceptionFqcn"] == "dlt.drill.FaultDrillError" and letter["userId"] == "alice"
    log = server.log.read_text()
    assert "attempt 1 of 3" in log and "attempt 2 of 3" in log and "failed 3 times" in log
    async with SseClient(base, "alice") as alice:
        await asyncio.sleep(2)  # connect catch-up and reconciliation skip a FAILED row
        assert alice.messages == []
        [delivery] = (await api("GET", f"{base}/api/admin/broadcasts/{sent['id']}/deliveries"))["items"]
        assert delivery["deliveryStatus"] == "FAILED"
        assert (await api("GET", f"{base}/api/admin/broadcasts/{sent['id']}/stats"))["failed"] == 1

        first = await api("POST", f"{base}{DLT}/redrive/{letter['id']}")
        assert first == {"id": letter["id"], "status": "REDRIVEN", "alreadyRedriven": False}
        [got] = await alice.wait_for(lambda e: e.event == "MESSAGE", timeout_s=30)
        assert got.data["broadcastId"] == sent["id"]
        second = await api("POST", f"{base}{DLT}/redrive/{letter['id']}")
        assert second["alreadyRedriven"] is True
        await asyncio.sleep(2.5)  # reconciliation rounds (1 s) and any second copy would have arrived by now
        assert [m.data["broadcastId"] for m in alice.messages] == [sent["id"]]

        # an ALL broadcast: the group topic's listener, the failure counter in the stats
        await api("POST", base + "/api/admin/testing/kafka-consumer-failure", {}, 201)
        everyone = await api("POST", base + "/api/admin/broadcasts", {"content": "to all", "targetType": "ALL"}, 201)
        [group_letter] = await dead_letters(base, 1, f"&broadcastId={everyone['id']}")
        assert group_letter["originalTopic"].endswith(constants.GROUP_TOPIC)
        assert (await api("GET", f"{base}/api/admin/broadcasts/{everyone['id']}/stats"))["failed"] == 1
        result = await api("POST", f"{base}{DLT}/redrive-all?broadcastId={everyone['id']}")
        assert (result["matched"], result["redriven"], result["failed"]) == (1, 1, 0)
        await alice.wait_for(lambda e: e.event == "MESSAGE" and e.data["broadcastId"] == everyone["id"], timeout_s=30)
        await asyncio.sleep(2.5)
        assert [m.data["broadcastId"] for m in alice.messages] == [sent["id"], everyone["id"]]
    assert (await api("GET", f"{base}/api/admin/broadcasts/{everyone['id']}/stats"))["failed"] == 0
    [delivery] = (await api("GET", f"{base}/api/admin/broadcasts/{sent['id']}/deliveries"))["items"]
    assert delivery["deliveryStatus"] == "DELIVERED"
    detail = await api("GET", f"{base}{DLT}/messages/{letter['id']}")
    assert detail["status"] == "REDRIVEN"
    assert [(a["actor"], a["action"], a["outcome"]) for a in detail["audit"]] == [
        ("admin", "REDRIVE", "REDRIVEN"),
        ("admin", "REDRIVE", "ALREADY_REDRIVEN"),
    ]
    assert "FaultDrillError" in detail["stacktrace"]


async def test_a_redrive_that_fails_again_goes_back_to_the_dlt_with_one_set_of_headers_and_no_growth(
    server: Server, env: dict[str, str], stack: StackInfo
) -> None:
    """RELIABILITY #16, a still-poison record: a drill armed with ``failRedrives`` keeps failing the broadcast,
    redrives included. Three redrive/fail rounds: each lands back in the DLT as a new letter, and its record,
    read from the dead-letter topic with a plain Kafka client, carries every header once (one set of
    ``kafka_dlt-exception-*`` headers, one ``broadcast_redriven_from`` naming the letter it came from), with
    the same header names and the same size round after round, far under the producer's
    ``max.request.size``. Once the drill is disarmed, one more redrive reaches the user exactly once."""
    base = server.base
    drill = await api("POST", base + "/api/admin/testing/kafka-consumer-failure", {"failRedrives": True}, 201)
    assert drill["failRedrives"] is True and drill["scope"] == "next broadcast"
    # alice is offline: a connected user's PENDING row would be sent by reconciliation whatever the consumer does
    sent = await api(
        "POST",
        base + "/api/admin/broadcasts",
        {"content": "still poison", "targetType": "SELECTED", "targetIds": ["alice"]},
        201,
    )
    letters = await dead_letters(base, 1, f"&broadcastId={sent['id']}")
    for round_ in range(1, ROUNDS + 1):
        newest = letters[0]  # newest first
        redriven = await api("POST", f"{base}{DLT}/redrive/{newest['id']}")
        assert redriven == {"id": newest["id"], "status": "REDRIVEN", "alreadyRedriven": False}
        letters = await dead_letters(base, round_ + 1, f"&broadcastId={sent['id']}")
        assert letters[0]["id"] > newest["id"], "the failed redrive is a new letter"
        assert [x["status"] for x in letters] == ["NEW"] + ["REDRIVEN"] * round_
        assert letters[0]["exceptionFqcn"] == "dlt.drill.FaultDrillError"
    by_position = {(x["dltPartition"], x["dltOffset"]): x["id"] for x in letters}

    dlt_topic = topic(env, constants.SELECTED_DLT_TOPIC)
    records = [
        r for r in await read_to_end(stack.kafka_bootstrap, dlt_topic) if r.value and sent["id"].encode() in r.value
    ]
    assert sorted((r.partition, r.offset) for r in records) == sorted(by_position), "one DLT record per letter"
    records.sort(key=lambda r: r.offset)
    names = [[k for k, _ in r.headers] for r in records]
    sizes = [
        len(r.key or b"") + len(r.value or b"") + sum(len(k.encode()) + len(v) for k, v in r.headers) for r in records
    ]
    for r, keys in zip(records, names, strict=True):
        assert len(keys) == len(set(keys)), f"a header repeated at offset {r.offset}: {Counter(keys).most_common(3)}"
        assert {k for k in keys if k.startswith(constants.DLT_EXCEPTION_HEADER_PREFIX)} >= {
            constants.DLT_EXCEPTION_FQCN,
            constants.DLT_EXCEPTION_MESSAGE,
            constants.DLT_EXCEPTION_STACKTRACE,
        }
    assert constants.HEADER_REDRIVEN_FROM not in names[0], "the first failure was not a redrive"
    for earlier, later in itertools.pairwise(records):
        came_from = dict(later.headers)[constants.HEADER_REDRIVEN_FROM]
        assert int(came_from) == by_position[(earlier.partition, earlier.offset)], "redriven from the letter before"
    assert all(n == names[1] for n in names[1:]), "the same headers, round after round"
    assert [k for k in names[1] if k != constants.HEADER_REDRIVEN_FROM] == names[0], "the first one's, plus one"
    assert max(sizes[1:]) - min(sizes[1:]) <= 16, f"no growth from round to round: {sizes}"
    assert max(sizes) < MAX_REQUEST_SIZE // 16, f"far under max.request.size ({MAX_REQUEST_SIZE}): {sizes}"
    detail = await api("GET", f"{base}{DLT}/messages/{letters[0]['id']}")
    shown = [h["key"] for h in detail["headers"]]
    assert shown == names[-1], "the store keeps the record's headers as they are"

    async with SseClient(base, "alice") as alice:
        await asyncio.sleep(2)  # connect catch-up and reconciliation skip a FAILED row
        assert alice.messages == []
        disarmed = await api("DELETE", f"{base}/api/admin/testing/kafka-consumer-failure/{drill['id']}")
        assert disarmed == {"id": drill["id"], "disarmed": True}
        final = await api("POST", f"{base}{DLT}/redrive/{letters[0]['id']}")
        assert final["alreadyRedriven"] is False
        [got] = await alice.wait_for(lambda e: e.event == "MESSAGE", timeout_s=30)
        assert got.data["broadcastId"] == sent["id"]
        await asyncio.sleep(2.5)  # reconciliation rounds (1 s) and any second copy would have arrived by now
        assert [m.data["broadcastId"] for m in alice.messages] == [sent["id"]]
    [delivery] = (await api("GET", f"{base}/api/admin/broadcasts/{sent['id']}/deliveries"))["items"]
    assert delivery["deliveryStatus"] == "DELIVERED"
    assert (await api("GET", f"{base}/api/admin/broadcasts/{sent['id']}/stats"))["failed"] == 0
    after = await dead_letters(base, ROUNDS + 1, f"&broadcastId={sent['id']}")
    assert [x["status"] for x in after] == ["REDRIVEN"] * (ROUNDS + 1), "no new letter once the drill is off"
    print(
        f"\nredrive of a still-poison record: {ROUNDS} rounds back to the DLT; headers per record "
        f"{[len(n) for n in names]}, bytes {sizes} (max.request.size {MAX_REQUEST_SIZE}); then delivered once"
    )


async def test_purge_writes_tombstones_and_empties_the_store(
    server: Server, env: dict[str, str], stack: StackInfo
) -> None:
    selected = topic(env, constants.SELECTED_TOPIC)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
    await producer.start()
    try:
        for n in range(3):
            await producer.send_and_wait(selected, f"junk {n}".encode(), key=f"user-{n}".encode())
    finally:
        await producer.stop()
    items = await dead_letters(server.base, 3)
    refused = await api("POST", f"{server.base}{DLT}/redrive/{items[0]['id']}", status=422)
    assert "not a valid event" in refused["detail"]
    one = items[0]
    assert await api("DELETE", f"{server.base}{DLT}/purge/{one['id']}") == {"id": one["id"], "purged": True}
    await api("GET", f"{server.base}{DLT}/messages/{one['id']}", status=404)
    result = await api("DELETE", f"{server.base}{DLT}/purge-all")
    assert (result["matched"], result["purged"], result["failed"]) == (2, 2, 0)
    dlt_topic = topic(env, constants.SELECTED_DLT_TOPIC)
    records = await read_topic(stack.kafka_bootstrap, dlt_topic, 6)
    tombstones = [r for r in records if r.value is None]
    assert sorted(r.key for r in tombstones if r.key) == [b"user-0", b"user-1", b"user-2"]
    for tombstone in tombstones:
        original = next(r for r in records if r.value is not None and r.key == tombstone.key)
        assert tombstone.partition == original.partition
    await asyncio.sleep(1.5)  # the DLT consumer has seen the tombstones by now: they are not stored
    assert (await api("GET", f"{server.base}{DLT}/summary"))["total"] == 0


async def test_the_dlt_api_refuses_bad_input_with_problems(server: Server) -> None:
    base = server.base
    for url, status in [
        (f"{DLT}/messages?limit=0", 400),
        (f"{DLT}/messages?limit=abc", 400),
        (f"{DLT}/messages?cursor=-1", 400),
        (f"{DLT}/messages?from=yesterday", 400),
        (f"{DLT}/messages?status=LOST", 400),
        (f"{DLT}/messages?colour=red", 400),
        (f"{DLT}/messages/99999999999999999999999", 404),
        (f"{DLT}/messages/abc", 404),
        (f"{DLT}/messages/12345", 404),
    ]:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(base + url, headers=ADMIN)
        assert response.status_code == status, (url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    async with httpx.AsyncClient(timeout=10) as http:
        anonymous = await http.get(base + f"{DLT}/messages")
        assert anonymous.status_code == 401
        bad_drill = await http.post(
            base + "/api/admin/testing/kafka-consumer-failure", json={"expiresInSeconds": 0}, headers=ADMIN
        )
        assert bad_drill.status_code == 400
        extra = await http.post(base + "/api/admin/testing/kafka-consumer-failure", json={"status": "x"}, headers=ADMIN)
        assert extra.status_code == 400
        missing = await http.post(base + f"{DLT}/redrive/4242", headers=ADMIN)
        assert missing.status_code == 404
