"""End-to-end fixtures: real server processes."""

from tests.servers import server_factory

__all__ = ["server_factory"]
