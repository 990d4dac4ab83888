"""End-to-end fixtures: real server processes (each module defines its own ``env``)."""

from tests.servers import server, server_factory

__all__ = ["server", "server_factory"]
