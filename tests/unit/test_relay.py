"""The relay's failure path: only the acknowledged prefix of a lane is marked; the rest follows in order."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

import pytest

from broadcast import relay
from broadcast.adapters.memory_stores import MemoryOutboxStore
from broadcast.domain import EventType, OutboxEvent
from broadcast.errors import PublishError
from broadcast.ports import OutgoingRecord, RecordPosition
from broadcast.relay import OutboxRelay
from broadcast.settings import RelaySettings


class FlakyPublisher:
    """Fails the records whose value is in ``fail`` once, acknowledges everything else."""

    def __init__(self, fail: set[bytes]) -> None:
        self.fail = fail
        self.sent: list[bytes] = []

    async def publish_many(self, records: Sequence[OutgoingRecord]) -> list[RecordPosition | PublishError]:
        results: list[RecordPosition | PublishError] = []
        for r in records:
            if r.value in self.fail:
                self.fail.discard(r.value)
                results.append(PublishError("broker said no"))
            else:
                self.sent.append(r.value or b"")
                results.append(RecordPosition(r.topic, 0, len(self.sent)))
        return results

    async def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> RecordPosition:
        raise NotImplementedError

    async def partitions_for(self, topic: str) -> int:
        return 1


async def test_rows_after_a_failed_one_wait_and_then_go_in_order() -> None:
    outbox = MemoryOutboxStore()
    await outbox.append([OutboxEvent("t", "alice", EventType.CREATED, f"m{n}".encode()) for n in range(3)])
    publisher = FlakyPublisher(fail={b"m1"})
    relay = OutboxRelay(outbox, publisher, RelaySettings(), owner="r")
    assert await relay.run_once() == 1, "only the acknowledged prefix (m0) counts as published"
    assert await outbox.backlog() == 2, "m2 waits for m1 even though its own send was acknowledged"
    assert await relay.run_once() == 2
    assert publisher.sent[-2:] == [b"m1", b"m2"], "the next round re-sends the rest in key order"
    assert await outbox.backlog() == 0


async def test_the_purge_runs_in_batches_off_the_relay_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A purge of many published rows is many short DELETEs on a loop of its own: the relay never waits for it."""
    outbox = MemoryOutboxStore()
    count = 2 * relay.PURGE_BATCH + 5
    ids = await outbox.append([OutboxEvent("t", f"k{n}", EventType.CREATED, b"v") for n in range(count)])
    await outbox.mark_published(ids)
    calls: list[int] = []
    purge = outbox.purge_published

    async def counted(older_than: timedelta, limit: int) -> int:
        deleted = await purge(older_than, limit)
        calls.append(deleted)
        return deleted

    monkeypatch.setattr(outbox, "purge_published", counted)
    purger = relay.OutboxPurger(outbox, RelaySettings(retention_seconds=0))
    assert await purger.run_once(asyncio.Event()) == count
    assert calls == [relay.PURGE_BATCH, relay.PURGE_BATCH, 5], "batches, each its own DELETE"

    async def stuck(older_than: timedelta, limit: int) -> int:
        await asyncio.Event().wait()  # a purge that takes for ever
        return 0

    monkeypatch.setattr(outbox, "purge_published", stuck)
    monkeypatch.setattr(relay, "PURGE_EVERY_S", 0.0)
    publisher, stop = FlakyPublisher(fail=set()), asyncio.Event()
    loop = asyncio.create_task(
        relay.OutboxRelay(outbox, publisher, RelaySettings(idle_poll_seconds=0.01), "r").run(stop)
    )
    await outbox.append([OutboxEvent("t", "a", EventType.CREATED, b"first")])
    await asyncio.sleep(0.1)
    await outbox.append([OutboxEvent("t", "a", EventType.CREATED, b"second")])
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(loop, 1)
    assert publisher.sent == [b"first", b"second"], "publishing goes on whatever the purge does"
