"""The relay's failure path: only the acknowledged prefix of a lane is marked; the rest follows in order."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NoReturn

import pytest

from broadcast.adapters.memory.stores import MemoryOutboxStore
from broadcast.core import constants
from broadcast.core.domain import PRIORITY_HEADER, EventType, OutboxEvent
from broadcast.core.ports.log import OutgoingRecord, RecordPosition
from broadcast.core.settings import RelaySettings, Settings
from broadcast.errors import PublishError, UnavailableError
from broadcast.observability.loops import Wakeups
from broadcast.outbox import relay
from broadcast.outbox.relay import OutboxRelay
from tests.waiting import wait_until


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


async def test_an_acknowledged_row_is_never_published_again_and_a_failed_one_is_retried() -> None:
    outbox = MemoryOutboxStore()
    await outbox.append([OutboxEvent("t", "alice", EventType.CREATED, f"m{n}".encode()) for n in range(3)])
    publisher = FlakyPublisher(fail={b"m1"})  # one lane; m2 acknowledged after m1 failed
    relay = OutboxRelay(outbox, publisher, RelaySettings(), owner="r")
    assert await relay.run_once() == 2, "m0 and m2 were acknowledged"
    assert await outbox.backlog() == 1
    assert await relay.run_once() == 1
    assert sorted(publisher.sent) == [b"m0", b"m1", b"m2"], "each sent once: an acknowledged row never again"
    assert await outbox.backlog() == 0


class PoisonPublisher(FlakyPublisher):
    """Refuses ``poison`` records for good (too large), and, as Kafka does with a batch, every record sent in
    the same call as one of them."""

    def __init__(self, poison: set[bytes]) -> None:
        super().__init__(set())
        self.poison = poison
        self.calls: list[list[bytes]] = []

    async def publish_many(self, records: Sequence[OutgoingRecord]) -> list[RecordPosition | PublishError]:
        values = [r.value or b"" for r in records]
        self.calls.append(values)
        if self.poison & set(values):
            return [PublishError("MessageSizeTooLargeError", poison=True)] * len(records)
        return await super().publish_many(records)


async def test_a_poison_row_fails_alone_then_leaves_its_lane_and_the_lane_goes_on() -> None:
    outbox = MemoryOutboxStore()
    key = "alice"  # one key: one lane, one partition
    await outbox.append([OutboxEvent("t", key, EventType.CREATED, f"m{n}".encode()) for n in range(4)])
    publisher = PoisonPublisher(poison={b"m1"})
    relay = OutboxRelay(outbox, publisher, RelaySettings(poison_attempts=3), owner="r")
    assert await relay.run_once() == 0, "the batch holding the poison row is refused whole"
    assert await relay.run_once() == 1, "then the lane goes one row at a time: m0 out, m1 refused, the rest wait"
    assert publisher.sent == [b"m0"]
    for _ in range(5):
        await relay.run_once()
    assert publisher.sent == [b"m0", b"m2", b"m3"], "after 3 refusals m1 left its lane; m2, m3 went, in order"
    assert await outbox.backlog() == 0 and await outbox.dead_count() == 1
    [dead] = await outbox.dead(10)
    assert (dead.event.payload, dead.attempts) == (b"m1", 3) and "MessageSizeTooLarge" in (dead.last_error or "")
    await outbox.append([OutboxEvent("t", key, EventType.CREATED, f"m{n}".encode()) for n in (4, 5)])
    assert await relay.run_once() == 2
    assert publisher.calls[-1] == [b"m4", b"m5"], "once no suspect is left, the lane is batched again"

    publisher.poison.clear()  # say an admin raised the broker's limit, then redrove it
    assert await outbox.redrive_dead(dead.id) is not None and await outbox.dead_count() == 0
    assert await relay.run_once() == 1 and publisher.sent[-1] == b"m1", "at the end of its lane"
    assert await outbox.redrive_dead(dead.id) is None, "gone"


async def test_broker_outages_never_kill_a_row() -> None:
    outbox = MemoryOutboxStore()
    await outbox.append([OutboxEvent("t", "alice", EventType.CREATED, b"m0")])
    publisher = FlakyPublisher(fail=set())
    relay = OutboxRelay(outbox, publisher, RelaySettings(poison_attempts=1), owner="r")
    for _ in range(5):
        publisher.fail.add(b"m0")  # not acknowledged (a retriable failure), round after round
        assert await relay.run_once() == 0
    assert await outbox.dead_count() == 0 and await outbox.backlog() == 1
    assert await relay.run_once() == 1


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


class Exited(BaseException):
    """What ``os._exit`` would do, in a form a test can catch."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def exit_here(code: int) -> NoReturn:
    raise Exited(code)


async def test_the_failpoint_ends_the_process_after_the_ack_and_before_the_mark() -> None:
    """``testing.relay_exit_after_acks`` (off by default): once that many records were acknowledged, the
    process exits with 137 before marking them; the relay that takes the lane over publishes them again."""
    assert Settings().testing.relay_exit_after_acks is None, "off unless configured"
    outbox = MemoryOutboxStore()
    await outbox.append([OutboxEvent("t", "alice", EventType.CREATED, f"m{n}".encode()) for n in range(2)])
    publisher = FlakyPublisher(fail=set())
    doomed = OutboxRelay(outbox, publisher, RelaySettings(), "doomed", exit_after_acks=3, exit_process=exit_here)
    assert await doomed.run_once() == 2, "2 of 3 acknowledged so far: published and marked"
    assert await outbox.backlog() == 0
    await outbox.append([OutboxEvent("t", "alice", EventType.CREATED, f"m{n}".encode()) for n in (2, 3, 4)])
    with pytest.raises(Exited) as exited:
        await doomed.run_once()
    assert exited.value.code == 137
    assert publisher.sent == [b"m0", b"m1", b"m2", b"m3", b"m4"], "the round's records were acknowledged"
    assert await outbox.backlog() == 3, "and none of them marked published"

    successor = OutboxRelay(outbox, publisher, RelaySettings(), "successor")
    assert await successor.run_once() == 3
    assert publisher.sent[5:] == [b"m2", b"m3", b"m4"], "published again, in order: the duplicates consumers meet"
    assert await outbox.backlog() == 0


async def test_the_failpoint_also_holds_on_the_one_row_at_a_time_path() -> None:
    """A lane with a suspect row goes one row at a time; the failpoint fires there too, before the mark."""
    outbox = MemoryOutboxStore()
    await outbox.append([OutboxEvent("t", "alice", EventType.CREATED, f"m{n}".encode()) for n in range(3)])
    publisher = PoisonPublisher(poison={b"m1"})
    doomed = OutboxRelay(outbox, publisher, RelaySettings(), "doomed", exit_after_acks=1, exit_process=exit_here)
    assert await doomed.run_once() == 0, "the batch with the poison row is refused whole: nothing acknowledged"
    with pytest.raises(Exited):
        await doomed.run_once()  # now one row at a time: m0 acknowledged, then the exit
    assert publisher.sent == [b"m0"] and await outbox.backlog() == 3


class CountingOutbox(MemoryOutboxStore):
    """The memory outbox, with the names of the calls a relay makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def claim(
        self, owner: str, max_lanes: int, lease: timedelta, limit: int, among: Sequence[int] | None = None
    ) -> dict[int, list[Any]]:
        self.calls.append("claim")
        return await super().claim(owner, max_lanes, lease, limit, among)

    async def finish(self, owner: str, lanes: Sequence[int], published: Sequence[int]) -> None:
        self.calls.append(f"finish {len(lanes)} lanes, {len(published)} marked")
        await super().finish(owner, lanes, published)


async def test_a_round_costs_one_claim_and_one_finish_whatever_the_lanes() -> None:
    outbox = CountingOutbox()
    await outbox.append([OutboxEvent("t", f"user-{n}", EventType.CREATED, f"m{n}".encode()) for n in range(40)])
    relay = OutboxRelay(outbox, FlakyPublisher(fail={b"m7"}), RelaySettings(lanes_per_claim=32), owner="r")
    published = await relay.run_once()
    lanes = len({outbox._rows[i].lane for i in outbox._rows})
    assert published == 39
    assert outbox.calls == ["claim", f"finish {lanes} lanes, 39 marked"], "the failed row is not marked"
    assert await outbox.backlog() == 1


async def test_a_round_that_fails_after_acknowledgements_still_marks_them_and_releases_its_lanes() -> None:
    class Broken(CountingOutbox):
        async def record_failure(self, ids: Sequence[int], error: str, poison: bool = False) -> None:
            raise UnavailableError("database gone")

    outbox = Broken()
    await outbox.append([OutboxEvent("t", "alice", EventType.CREATED, f"m{n}".encode()) for n in range(3)])
    relay = OutboxRelay(outbox, FlakyPublisher(fail={b"m1"}), RelaySettings(), owner="r")
    with pytest.raises(UnavailableError):
        await relay.run_once()
    assert outbox.calls == ["claim", "finish 1 lanes, 2 marked"], "m0 and m2 were acknowledged: never again"
    assert await outbox.claim("other", 10, timedelta(seconds=30), 10) != {}, "the lane was released"


class GatedPublisher(FlakyPublisher):
    """Holds every call whose records go to ``held`` until ``gate`` opens: a bulk round stuck publishing."""

    def __init__(self, held: str) -> None:
        super().__init__(set())
        self.held = held
        self.gate = asyncio.Event()

    async def publish_many(self, records: Sequence[OutgoingRecord]) -> list[RecordPosition | PublishError]:
        if any(r.topic == self.held for r in records):
            await self.gate.wait()
        return await super().publish_many(records)


async def test_the_priority_relay_publishes_an_urgent_row_while_the_bulk_relay_is_stuck_in_a_round() -> None:
    """Priority lanes (issue 20): the two relay loops claim disjoint lane classes, so an URGENT row is
    published while a bulk round holds every normal lane; the bulk rows follow once its round goes on."""
    outbox = MemoryOutboxStore()
    await outbox.append([OutboxEvent("bulk", f"user-{n}", EventType.CREATED, b"bulk-%d" % n) for n in range(500)])
    urgent = OutboxEvent("urgent", "user-7", EventType.CREATED, b"urgent", (PRIORITY_HEADER,))
    await outbox.append([urgent])
    publisher = GatedPublisher(held="bulk")
    wakeups = Wakeups()
    settings = RelaySettings(lanes_per_claim=64, idle_poll_seconds=30)
    bulk = OutboxRelay(outbox, publisher, settings, "r", wakeups.event(), lanes=constants.NORMAL_LANES)
    priority = OutboxRelay(outbox, publisher, settings, "r:priority", wakeups.event(), lanes=constants.PRIORITY_LANES)
    stop = asyncio.Event()
    loops = [asyncio.create_task(r.run(stop)) for r in (bulk, priority)]
    try:
        await wait_until(lambda: b"urgent" in publisher.sent, 5, "the urgent row published")
        assert publisher.sent == [b"urgent"], "nothing of the bulk yet: its round is stuck publishing"
        later = OutboxEvent("urgent", "user-8", EventType.CREATED, b"urgent-2", (PRIORITY_HEADER,))
        await outbox.append([later])
        wakeups.set()  # as a commit does; the priority loop sleeps 30 s otherwise
        await wait_until(lambda: b"urgent-2" in publisher.sent, 5, "the second urgent row published")
        publisher.gate.set()
        await wait_until(lambda: len(publisher.sent) == 502, 5, "the bulk published")
        assert await outbox.backlog() == 0 and publisher.sent[:2] == [b"urgent", b"urgent-2"]
    finally:
        stop.set()
        publisher.gate.set()
        await asyncio.gather(*loops)
