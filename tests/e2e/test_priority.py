"""Priority lanes end to end (issue 20): an URGENT message overtakes a bulk broadcast's backlog."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.servers import Server, isolated_env
from devstack.stack import StackInfo
from tests.e2e.test_delivery import post
from tests.sse_client import SseClient
from tests.waiting import wait_until

BULK = 3_000
PER_RECORD_MS = 10  # the delivery failpoint: the bulk drains at most ~4 batches at a time, 10 ms a record


@pytest.fixture
def env(stack: StackInfo, unique_name: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    yield isolated_env(stack, unique_name, tmp_path, BROADCAST_TESTING__DELIVERY_RECORD_DELAY_MS=str(PER_RECORD_MS))


async def test_an_urgent_message_overtakes_a_bulk_broadcast_queued_before_it(server: Server) -> None:
    """A NORMAL bulk to 3,000 users, alice last, is posted first; while its records queue in their partitions
    (alice's behind about 300 others, 10 ms each), an URGENT message to alice reaches her first, through the
    priority lanes, topic and consumer. Then the bulk one arrives too: each once, nothing lost."""
    listeners = ("delivery-selected", "delivery-selected-priority")  # both consuming before the race starts
    await wait_until(
        lambda: all(f"{n} member 0: assigned" in server.log.read_text() for n in listeners), 60, "listeners assigned"
    )
    async with SseClient(server.base, "alice") as alice:
        bulk = await post(
            server.base,
            {"content": "bulk", "targetType": "SELECTED", "targetIds": [*(f"u{n}" for n in range(BULK)), "alice"]},
        )
        started = time.monotonic()
        urgent = await post(
            server.base, {"content": "urgent", "targetType": "SELECTED", "targetIds": ["alice"], "priority": "URGENT"}
        )
        first = (await alice.wait_for(lambda e: e.event == "MESSAGE", timeout_s=30))[0]
        took = time.monotonic() - started
        assert first.data["broadcastId"] == urgent["id"], "the URGENT one came first, though posted second"
        await alice.wait_for(lambda e: e.event == "MESSAGE", count=2, timeout_s=120)
        assert sorted(m.data["broadcastId"] for m in alice.messages) == sorted([bulk["id"], urgent["id"]])
        print(f"\nURGENT behind a {BULK:,}-recipient bulk: {took * 1000:.0f} ms to alice; the bulk one followed")
