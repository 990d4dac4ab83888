"""Delivery under faults, on the real stack with real server processes and real SSE clients.

Each test breaks one thing while messages flow — a consumer-only instance, a client that stops reading
(scenario 11 of the fault suite) — and checks what a user would: every broadcast the API acknowledged
(201) reaches the client, in order, and none twice. Brokers, app instances, PostgreSQL, Redis and poison
records are in ``test_broker_faults``, ``test_app_faults`` and ``test_dependency_faults``. The numbers
(recovery time, duplicates, RSS) are in the assertion messages and printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from devstack.servers import Server
from devstack.sse_frames import FrameReader
from tests.auth import bearer, token
from tests.faults.harness import base_samples, last_assignment
from tests.sse_client import SseClient
from tests.topics import default_partition
from tests.waiting import wait_until

ADMIN = bearer("admin", "admin")
PARTITIONS = 10
Body = Callable[[int], dict[str, Any]]


def start(
    env: dict[str, str], cwd: Path, factory: list[Server], roles: str | None = None, name: str = "server"
) -> Server:
    """A live server process; ``server_factory`` stops it at teardown."""
    server = Server(env, cwd, roles=roles, name=name)
    factory.append(server)
    server.wait_live()
    return server


def to_user(user: str) -> Body:
    return lambda n: {"content": f"m{n}", "targetType": "SELECTED", "targetIds": [user]}


class Sender:
    """Posts broadcasts one after another at a steady pace; remembers which ones the API acknowledged."""

    def __init__(self, base: str, body: Body, count: int, interval_s: float) -> None:
        self.base, self.body, self.count, self.interval_s = base, body, count, interval_s
        self.acknowledged: list[str] = []
        self.refused: list[str] = []  # not acknowledged: the user was told, so nothing is owed

    @property
    def attempted(self) -> int:
        return len(self.acknowledged) + len(self.refused)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            for n in range(self.count):
                try:
                    response = await http.post(self.base + "/api/admin/broadcasts", json=self.body(n), headers=ADMIN)
                except httpx.HTTPError as exc:
                    self.refused.append(repr(exc))
                else:
                    if response.status_code == 201:
                        self.acknowledged.append(response.json()["id"])
                    else:
                        self.refused.append(f"{response.status_code}: {response.text[:200]}")
                await asyncio.sleep(self.interval_s)

    async def reached(self, attempts: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.attempted < attempts:
            assert time.monotonic() < deadline, f"only {self.attempted}/{attempts} posts within {timeout_s} s"
            await asyncio.sleep(0.02)


async def received_all(client: SseClient, ids: list[str], timeout_s: float) -> float:
    """Wait until ``client`` got a MESSAGE for every id in ``ids``; returns the seconds it took."""
    started = time.monotonic()
    wanted = set(ids)
    while True:
        missing = wanted - {m.data["broadcastId"] for m in client.messages}
        if not missing:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(
                f"{len(missing)}/{len(wanted)} acknowledged broadcasts never arrived: {sorted(missing)}"
            )
        await asyncio.sleep(0.1)


def check_once(client: SseClient, acknowledged: list[str], in_order: bool = True) -> int:
    """Assert no duplicate survives dedupe by SSE id (and, for one user's SELECTED messages, their order);
    return the raw duplicates (repeats with the same SSE id, which a client drops)."""
    seen = [(m.id, m.data["broadcastId"]) for m in client.messages]
    raw = len(seen) - len({b for _, b in seen})
    by_event_id = dict(seen)
    after_dedupe = len(by_event_id) - len(set(by_event_id.values()))
    assert after_dedupe == 0, f"{after_dedupe} duplicates under distinct SSE ids ({raw} raw duplicates)"
    if in_order:
        first_seen = list(dict.fromkeys(b for _, b in seen))
        wanted = set(acknowledged)
        assert [b for b in first_seen if b in wanted] == acknowledged, f"per-user order broken ({raw} raw dupl.)"
    return raw


async def test_a_consumer_instance_killed_mid_stream_loses_and_repeats_nothing(
    env: dict[str, str], tmp_path: Path, server_factory: list[Server]
) -> None:
    edge = start(env, tmp_path, server_factory, roles="api", name="edge")
    workers = [start(env, tmp_path, server_factory, "api,relay,consumers,scheduler", f"worker-{n}") for n in "bc"]

    def split() -> bool:  # both workers in the group, the partitions divided between them
        a, b = (last_assignment(w.log, "delivery-selected") for w in workers)
        return bool(a and b and not a & b and len(a | b) == PARTITIONS)

    await wait_until(split, 40, "the two workers sharing the selected topic")
    alice_partition = default_partition(b"alice", PARTITIONS)
    [victim] = [w for w in workers if alice_partition in (last_assignment(w.log, "delivery-selected") or ())]
    [survivor] = [w for w in workers if w is not victim]
    async with SseClient(edge.base, "alice") as alice:
        sender = Sender(edge.base, to_user("alice"), 200, 0.03)
        sending = asyncio.create_task(sender.run())
        await sender.reached(70)
        victim.proc.kill()  # SIGKILL the worker consuming alice's partition: no revocation, no commit
        await asyncio.to_thread(victim.proc.wait, 10)
        killed = time.monotonic()
        taking_over = asyncio.create_task(
            wait_until(
                lambda: last_assignment(survivor.log, "delivery-selected") == set(range(PARTITIONS)),
                40,
                "the survivor taking over every partition",
            )
        )
        await asyncio.wait_for(sending, 60)
        after_sent = await received_all(alice, sender.acknowledged, 40)
        recovered = time.monotonic() - killed
        takeover = await taking_over
        await asyncio.sleep(1.5)  # a later reconciliation round or redelivery must not repeat anything
        raw = check_once(alice, sender.acknowledged)
    print(
        f"\nconsumer kill: {len(sender.acknowledged)} acknowledged, {len(sender.refused)} refused; takeover "
        f"{takeover:.1f} s after kill; all received {after_sent:.1f} s after the last post, {recovered:.1f} s "
        f"after the kill; raw duplicates {raw}"
    )
    assert len(sender.acknowledged) == 200, sender.refused


class FrozenClient:
    """A separate reader process (``tests/faults/reader.py``) on one SSE stream, SIGSTOPped once the
    stream is up: its socket's small receive buffer fills and the server's writes block."""

    def __init__(self, port: int, user: str, folder: Path) -> None:
        self.out = folder / f"{user}.sse"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.reader", str(port), token(user), str(self.out)]
        )
        deadline = time.monotonic() + 20
        while not (self.out.exists() and b"event: CONNECTED" in self.out.read_bytes()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the reader never got CONNECTED")
            time.sleep(0.05)
        self.proc.send_signal(signal.SIGSTOP)
        self.port = int(self.out.with_suffix(".port").read_text())

    def drain(self, timeout_s: float) -> bool:
        """SIGCONT: the reader reads again; True if the server ended the stream (the reader exited) in time."""
        self.proc.send_signal(signal.SIGCONT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False
        return True

    def message_ids(self) -> list[tuple[str, str]]:
        """(SSE id, broadcast id) of every complete MESSAGE event received."""
        body = self.out.read_bytes().split(b"\r\n\r\n", 1)[1]
        return [
            (frame.id, str(orjson.loads(frame.data)["broadcastId"]))
            for frame in FrameReader().feed(body)  # complete frames only: a partial last one stays unread
            if frame.event == "MESSAGE" and frame.id is not None and frame.data is not None
        ]


FROZEN = 8


@pytest.fixture
def readers() -> Iterator[list[FrozenClient]]:
    """Frozen clients a test starts; any still running (stopped or not) is killed at teardown."""
    started: list[FrozenClient] = []
    yield started
    for client in started:
        if client.proc.poll() is None:
            client.proc.kill()
            client.proc.wait()


def server_sockets(server_port: int, client_ports: list[int]) -> list[int]:
    """Which of ``client_ports`` still have a server-side TCP socket (any state) on ``server_port``."""
    held = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote = line.split()[1:3]
            if int(local.rsplit(":", 1)[1], 16) == server_port:
                held.add(int(remote.rsplit(":", 1)[1], 16))
    return sorted(held.intersection(client_ports))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def test_a_frozen_client_is_dropped_and_resumes_without_a_gap(
    env: dict[str, str], tmp_path: Path, server_factory: list[Server], readers: list[FrozenClient]
) -> None:
    small = {**env, "BROADCAST_SSE__QUEUE_SIZE": "8", "BROADCAST_SSE__SEND_TIMEOUT_SECONDS": "2"}
    # the resume below replays ~6 MB (600 x 10 KB): above the default catch-up bound (1 MiB, then RESYNC and the
    # inbox; tested in tests/e2e/test_delivery.py), so the bound is raised to test the stream's own replay here
    small["BROADCAST_SSE__REPLAY_BYTES"] = str(16 * 1024 * 1024)
    server = start(small, tmp_path, server_factory)
    big = "x" * 9_990  # near the 10,000-character limit: each event is ~10 KB on the wire
    async with SseClient(server.base, "bob") as bob:  # a healthy reader alongside: never dropped
        frozen = [await asyncio.to_thread(FrozenClient, server.port, f"frozen{n}", tmp_path) for n in range(FROZEN)]
        readers.extend(frozen)
        warm = Sender(server.base, lambda n: {"content": f"w{n}", "targetType": "ALL"}, 5, 0.0)
        await warm.run()
        await received_all(bob, warm.acknowledged, 20)
        rss_before = rss_kib(server.proc.pid)
        sender = Sender(server.base, lambda n: {"content": f"{n} {big}", "targetType": "ALL"}, 600, 0.0)
        started = time.monotonic()
        sending = asyncio.create_task(sender.run())
        drops = await wait_until(
            lambda: server.log.read_text().count("dropping slow connection") >= FROZEN, 60, "the drops"
        )
        dropped_after = sender.attempted
        await asyncio.wait_for(sending, 60)
        sent_s = time.monotonic() - started
        await received_all(bob, sender.acknowledged, 30)
        rss_after = rss_kib(server.proc.pid)
        held = server_sockets(server.port, [c.port for c in frozen])
        assert held == [], f"the server still holds dropped sockets (client ports {held}): it must abort them"
        ended = [await asyncio.to_thread(c.drain, 15) for c in frozen]  # SIGCONT: the client reads again
        assert all(ended), "the server must end a stream it dropped"
        everything = warm.acknowledged + sender.acknowledged
        resumed = []
        for n, client in enumerate(frozen):
            seen = client.message_ids()
            assert seen, "the frozen client got nothing before it froze"
            async with SseClient(server.base, f"frozen{n}", last_event_id=seen[-1][0]) as again:
                missed = set(everything) - {b for _, b in seen}
                await received_all(again, list(missed), 30)
                await asyncio.sleep(1.0)
                assert not [e for e in again.events if e.event == "RESYNC"]
                both = seen + [(m.id or "", m.data["broadcastId"]) for m in again.messages]
                by_event_id = dict(both)  # what the client keeps after dropping repeats by SSE id
                assert sorted(by_event_id.values()) == sorted(everything), "a gap or a duplicate across the resume"
                resumed.append((len(seen), len(missed), len(again.messages)))
        assert check_once(bob, everything, in_order=False) == 0
        assert "of bob" not in server.log.read_text(), "the healthy reader must not be dropped"
    grown_mib = (rss_after - rss_before) / 1024
    print(
        f"\nfrozen clients: {len(sender.acknowledged)} x 10 KB sent in {sent_s:.1f} s; all {FROZEN} dropped "
        f"{drops:.1f} s in, after {dropped_after} broadcasts; RSS {rss_before / 1024:.1f} -> "
        f"{rss_after / 1024:.1f} MiB; per client (events got before the stream ended, missed, sent on resume): "
        f"{resumed}"
    )
    # unbounded buffering would hold ~(600 - what the socket buffers took) x 10 KB per frozen client
    assert grown_mib < 12, f"RSS grew by {grown_mib:.1f} MiB while {FROZEN} clients were frozen"


IDLE_PAUSE_S, IDLE_HEARTBEAT_S = 20.0, 0.5


async def test_frozen_idle_clients_hold_nothing_up_and_read_on_after_their_pause(
    env: dict[str, str], tmp_path: Path, server_factory: list[Server], readers: list[FrozenClient]
) -> None:
    """RELIABILITY #27, the idle variant (pings only): 8 readers SIGSTOPped for 20 s while nothing but
    heartbeats (every 0.5 s) flows. A heartbeat to a frozen socket never holds the others up: a healthy client
    gets every heartbeat on time. A frozen idle stream is a live TCP connection whose kernel buffer takes the
    few hundred bytes, so it is not dropped and costs no memory that grows; on SIGCONT each reader reads the
    heartbeats of its pause, then a broadcast."""
    quick = {**env, "BROADCAST_SSE__HEARTBEAT_SECONDS": str(IDLE_HEARTBEAT_S)}
    quick["BROADCAST_SSE__SEND_TIMEOUT_SECONDS"] = "2"
    server = start(quick, tmp_path, server_factory)
    async with SseClient(server.base, "bob") as bob:
        frozen = [await asyncio.to_thread(FrozenClient, server.port, f"idle{n}", tmp_path) for n in range(FROZEN)]
        readers.extend(frozen)
        rss_before = rss_kib(server.proc.pid)
        paused_at = time.monotonic()
        await asyncio.sleep(IDLE_PAUSE_S)
        resumed_at = time.monotonic()
        rss_after = rss_kib(server.proc.pid)
        beats = [paused_at, *(t for t in bob.comments if paused_at < t < resumed_at), resumed_at]
        longest = max(b - a for a, b in itertools.pairwise(beats))
        for client in frozen:
            client.proc.send_signal(signal.SIGCONT)
        sender = Sender(server.base, lambda n: {"content": f"after the pause {n}", "targetType": "ALL"}, 1, 0.0)
        await sender.run()
        [after] = sender.acknowledged
        await received_all(bob, [after], 20)
        got = await wait_until(
            lambda: all(after in {b for _, b in c.message_ids()} for c in frozen), 20, "the broadcast at every reader"
        )
        pause_beats = [c.out.read_bytes().count(b": heartbeat") for c in frozen]
    log = server.log.read_text()
    print(
        f"\nfrozen idle clients: {FROZEN} paused {IDLE_PAUSE_S:.0f} s with heartbeats every {IDLE_HEARTBEAT_S} s; "
        f"the healthy client's longest wait for a heartbeat {longest:.2f} s; RSS {rss_before / 1024:.1f} -> "
        f"{rss_after / 1024:.1f} MiB; heartbeats each reader read after its pause {pause_beats}; the broadcast "
        f"after the pause reached all {got:.1f} s after SIGCONT"
    )
    assert longest < 3 * IDLE_HEARTBEAT_S, f"a heartbeat held up {longest:.2f} s behind the frozen streams"
    assert "dropping slow connection" not in log, "an idle frozen stream is a live connection: not dropped"
    assert min(pause_beats) >= 0.8 * IDLE_PAUSE_S / IDLE_HEARTBEAT_S, "the pause's heartbeats were buffered, not lost"
    assert (rss_after - rss_before) / 1024 < 4, "frozen idle streams must not grow the server's memory"


SOAK_UNIT_S = 60.0  # the soak's length at BROADCAST_FAULT_SCALE=1; 30 gives RELIABILITY's 30 minutes
SOAK_FROZEN = 4


async def test_frozen_clients_through_a_soak_leave_rss_flat(
    env: dict[str, str], tmp_path: Path, server_factory: list[Server], readers: list[FrozenClient], fault_scale: int
) -> None:
    """RELIABILITY #27 over time: for ``60 s x BROADCAST_FAULT_SCALE`` (``=30``: the scenario's 30 minutes),
    4 KB ALL broadcasts flow at ~5/s while 4 readers stay frozen (SIGSTOP). A frozen stream's socket is let
    go by the server: by the kernel's ``TCP_USER_TIMEOUT`` (``sse.dead_peer_seconds``: its zero window
    stopped taking data) or, once the socket buffers are full, the slow-connection drop after the send
    timeout; every 5 s a reader the server let go is killed and a new one freezes in its place. The healthy
    reader gets every broadcast once; RSS, sampled every 5 s, stays flat: the median of the last fifth is
    within 8 MiB of the second fifth's (the first is warm-up); once the readers are gone the server holds
    bob's stream only."""
    quick = {**env, "BROADCAST_SSE__QUEUE_SIZE": "8", "BROADCAST_SSE__SEND_TIMEOUT_SECONDS": "2"}
    server = start(quick, tmp_path, server_factory)
    duration = SOAK_UNIT_S * fault_scale
    body = "y" * 4_000
    names = itertools.count()

    def freeze() -> FrozenClient:
        client = FrozenClient(server.port, f"soak{next(names)}", tmp_path)
        readers.append(client)
        return client

    async with SseClient(server.base, "bob") as bob:
        frozen = [await asyncio.to_thread(freeze) for _ in range(SOAK_FROZEN)]
        sender = Sender(server.base, lambda n: {"content": f"{n} {body}", "targetType": "ALL"}, 10_000_000, 0.2)
        sending = asyncio.create_task(sender.run())
        samples: list[int] = []
        replaced = 0
        started = time.monotonic()
        try:
            while time.monotonic() - started < duration:
                await asyncio.sleep(5)
                samples.append(rss_kib(server.proc.pid))
                for client in [c for c in frozen if not server_sockets(server.port, [c.port])]:
                    client.proc.kill()
                    client.proc.wait()
                    frozen[frozen.index(client)] = await asyncio.to_thread(freeze)
                    replaced += 1
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        await received_all(bob, sender.acknowledged, 60)
        assert check_once(bob, sender.acknowledged, in_order=False) == 0
        for client in frozen:
            client.proc.kill()
            client.proc.wait()
        streams = await wait_until_streams(server.base, 1, 30)
    drops = server.log.read_text().count("dropping slow connection")
    fifth = max(1, len(samples) // 5)
    early = sorted(samples[fifth : 2 * fifth])
    late = sorted(samples[-fifth:])
    early_mib, late_mib = early[len(early) // 2] / 1024, late[len(late) // 2] / 1024
    print(
        f"\nsoak {time.monotonic() - started:.0f} s: {len(sender.acknowledged)} x 4 KB broadcasts, {SOAK_FROZEN} "
        f"readers frozen throughout, {replaced} let go by the server and replaced ({drops} of them dropped for "
        f"slowness, the rest by TCP_USER_TIMEOUT); RSS median "
        f"{early_mib:.1f} MiB (second fifth) -> {late_mib:.1f} MiB (last fifth), max {max(samples) / 1024:.1f} MiB "
        f"over {len(samples)} samples"
    )
    assert sender.refused == [], sender.refused[:3]
    assert streams == 1, "only bob's stream is left"
    assert late_mib - early_mib < 8, f"RSS grew {late_mib - early_mib:.1f} MiB over the soak"


async def wait_until_streams(base: str, expected: int, timeout_s: float) -> int:
    """Poll the instance's open-stream gauge until it reads ``expected``; the last reading."""
    deadline = time.monotonic() + timeout_s
    while True:
        [(_, value)] = await base_samples(base, "broadcast_sse_connections")
        if int(value) == expected or time.monotonic() > deadline:
            return int(value)
        await asyncio.sleep(0.5)
