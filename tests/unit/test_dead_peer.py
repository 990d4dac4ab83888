"""Dead-peer detection on a stream's socket: set on a live one; a socket the client already closed is no error."""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from broadcast.core import constants
from sse.stream import detect_dead_peer


class _Cycle:
    """Stands for uvicorn's request cycle: ``send.__self__.transport`` is where the stream finds its socket."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    async def send(self, message: Any) -> None: ...


async def _accepted_transport() -> tuple[Any, asyncio.StreamWriter, asyncio.AbstractServer]:
    accepted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    class Keep(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(transport)

    server = await asyncio.get_running_loop().create_server(Keep, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    return await accepted, writer, server


def test_a_live_socket_gets_keepalive_and_one_already_gone_is_not_an_error() -> None:
    async def scenario() -> tuple[bool, bool]:
        transport, writer, server = await _accepted_transport()
        live = detect_dead_peer({constants.RAW_SEND_SCOPE_KEY: _Cycle(transport).send}, 60.0)
        transport.abort()  # the client went between the response head and this call (seen under load)
        await asyncio.sleep(0)
        gone = detect_dead_peer({constants.RAW_SEND_SCOPE_KEY: _Cycle(transport).send}, 60.0)
        writer.close()
        server.close()
        return live, gone

    assert uvloop.run(scenario()) == (True, False)
