"""The relay's failure path: only the acknowledged prefix of a lane is marked; the rest follows in order."""

from __future__ import annotations

from collections.abc import Sequence

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
