"""Group tallies (broadcast/core/reach.py) and the delivered marker's group path, on fakes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from broadcast.core.ports.stores import InboxStore
from broadcast.core.reach import Reach, ReachRow, union
from broadcast.errors import UnavailableError
from sse.fanout import DeliveredMarker


def test_a_tally_counts_each_user_once_and_is_dirty_only_when_it_grew() -> None:
    now = [0.0]
    reach = Reach("i1", idle_s=60, clock=lambda: now[0])
    reach.learn({"alice": 1, "bob": 2})
    assert reach.add("b1", ["alice", "alice", "bob", "carol"]) == ["carol"], "an unnumbered user is not counted"
    [row] = reach.dirty()
    assert (row.broadcast_id, row.reached) == ("b1", 2) and set(union([row.users])) == {1, 2}
    reach.saved([row])
    assert reach.dirty() == []
    reach.add("b1", ["bob"])
    assert reach.dirty() == [], "a repeat does not grow it"
    reach.add("b1", ["carol"], {"carol": 3})
    [grown] = reach.dirty()
    assert grown.tally == row.tally and grown.reached == 3, "the same tally, saved whole again"


def test_an_idle_tally_leaves_memory_and_a_later_delivery_starts_a_tally_of_its_own() -> None:
    now = [0.0]
    reach = Reach("i1", idle_s=60, clock=lambda: now[0])
    reach.add("b1", ["alice"], {"alice": 1})
    [first] = reach.dirty()
    reach.saved([first])
    now[0] = 61
    reach.saved([])
    assert len(reach) == 0
    reach.add("b1", ["bob"], {"bob": 2})
    [second] = reach.dirty()
    assert second.tally != first.tally, "a new key: the stored tally with alice is not overwritten"
    assert len(union([first.users, second.users])) == 2


def test_saved_keeps_a_tally_dirty_that_grew_after_its_snapshot() -> None:
    reach = Reach("i1")
    reach.add("b1", ["alice"], {"alice": 1})
    [snapshot] = reach.dirty()
    reach.add("b1", ["bob"], {"bob": 2})
    reach.saved([snapshot])
    assert [r.reached for r in reach.dirty()] == [2]


def test_two_processes_never_share_a_key() -> None:
    one, other = Reach("same-instance-id"), Reach("same-instance-id")  # a restart keeps the instance id
    one.add("b1", ["alice"], {"alice": 1})
    other.add("b1", ["alice"], {"alice": 1})
    assert one.dirty()[0].tally != other.dirty()[0].tally


def test_the_number_cache_is_bounded() -> None:
    reach = Reach("i1", numbers_cached=2)
    reach.learn({"a": 1, "b": 2, "c": 3})
    assert reach.unknown(["a", "b", "c"]) == ["a"]


class FlakyInbox:
    def __init__(self) -> None:
        self.numbering_fails = True
        self.saving_fails = True
        self.saved: list[ReachRow] = []
        self.marked: list[tuple[str, str]] = []

    async def mark_delivered(self, pairs: Sequence[tuple[str, str]]) -> int:
        self.marked.extend(pairs)
        return len(pairs)

    async def user_numbers(self, user_ids: Sequence[str]) -> dict[str, int]:
        if self.numbering_fails:
            raise UnavailableError("database down")
        return {u: ord(u[0]) for u in user_ids}

    async def save_reach(self, rows: Sequence[ReachRow]) -> int:
        if self.saving_fails:
            raise UnavailableError("database down")
        self.saved.extend(rows)
        return len(rows)


async def test_the_marker_tallies_group_deliveries_and_retries_what_failed() -> None:
    inbox = FlakyInbox()
    marker = DeliveredMarker(cast(InboxStore, inbox), 1.0, reach=Reach("i1"))
    marker.add("g1", "alice", group=True)
    marker.add("g1", "alice", group=True)
    marker.add("s1", "bob")
    await marker.flush()
    assert inbox.marked == [("s1", "bob")], "a SELECTED delivery marks its row; a group one never"
    assert inbox.saved == []
    inbox.numbering_fails = False
    marker.add("g1", "bob", group=True)
    await marker.flush()  # numbered now; the save fails: the tally stays dirty
    assert inbox.saved == []
    inbox.saving_fails = False
    await marker.flush()
    [row] = inbox.saved
    assert (row.broadcast_id, row.reached, set(union([row.users]))) == ("g1", 2, {ord("a"), ord("b")})
    await marker.flush()
    assert len(inbox.saved) == 1, "nothing new: nothing saved"
