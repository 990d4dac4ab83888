"""The Redis bus on the real Redis: what the in-process bus cannot show (connections that break)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from broadcast.adapters.redis.bus import RedisBus, RedisPresence, create_client
from broadcast.core.ports.bus import BusMessage
from broadcast.core.settings import RedisSettings
from broadcast.errors import UnavailableError
from devstack.stack import StackInfo


async def test_a_broken_subscription_connection_ends_the_subscription_instead_of_hiding_the_gap(
    stack: StackInfo, unique_name: str
) -> None:
    client = create_client(RedisSettings(url=SecretStr(stack.redis_url), key_prefix=f"{unique_name}:"))
    bus = RedisBus(client, f"{unique_name}:")
    try:
        async with bus.subscribe(["group"]) as subscription:
            assert await bus.publish("group", b"before") == 1
            assert await subscription.get(5) == BusMessage("group", b"before")
            connection = subscription._pubsub.connection
            assert connection is not None and connection._writer is not None
            host, port = connection._writer.get_extra_info("sockname")[:2]
            assert await client.execute_command("CLIENT", "KILL", "ADDR", f"{host}:{port}") in (1, b"OK", "OK", True)
            assert await bus.publish("group", b"lost") == 0, "nobody is subscribed while the connection is gone"
            with pytest.raises(UnavailableError, match=r"reconnected|subscription failed"):
                for _ in range(20):  # redis-py reconnects and resubscribes by itself on the next read
                    await subscription.get(0.25)
                    await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def test_presence_lookups_survive_a_server_that_forgot_the_lookup_script(
    stack: StackInfo, unique_name: str
) -> None:
    """A restarted Redis has an empty script cache: the next lookup loads the script again (NOSCRIPT)."""
    client = create_client(RedisSettings(url=SecretStr(stack.redis_url), key_prefix=f"{unique_name}:"))
    presence = RedisPresence(client, f"{unique_name}:", ttl_seconds=30)
    try:
        await presence.heartbeat_many(["alice", "bob"], "i1")
        assert await presence.instances_many(["alice", "carol"]) == {"alice": {"i1"}, "carol": frozenset()}
        await client.script_flush()
        assert await presence.instances_many(["bob", "carol"]) == {"bob": {"i1"}, "carol": frozenset()}
    finally:
        await client.aclose()
