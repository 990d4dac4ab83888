"""End-to-end fixtures: real server processes."""

from pathlib import Path

import pytest

from tests.servers import Server, server_factory

__all__ = ["server", "server_factory"]


@pytest.fixture
def server(env: dict[str, str], tmp_path: Path, server_factory: list[Server]) -> Server:
    """One live server process (all roles) on the test module's own ``env``."""
    started = Server(env, tmp_path)
    server_factory.append(started)
    started.wait_live()
    return started
