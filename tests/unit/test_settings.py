"""Settings: the embedded default with nothing configured, BROADCAST_ variables otherwise."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from broadcast.core import envelope
from broadcast.core.domain import Broadcast, BroadcastStatus, Priority, TargetType
from broadcast.core.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("BROADCAST_"):
            monkeypatch.delenv(name)


def test_nothing_configured_is_the_embedded_default() -> None:
    settings = Settings()
    assert settings.embedded
    assert settings.database.dialect == "sqlite"
    assert settings.kafka.embedded and settings.redis.embedded
    assert "in-process event log" in settings.describe()


def test_nested_variables_point_at_real_components(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROADCAST_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:11092")
    monkeypatch.setenv("BROADCAST_DATABASE__URL", "postgresql://u:p@127.0.0.1:15432/db")
    monkeypatch.setenv("BROADCAST_REDIS__URL", "redis://127.0.0.1:16379/0")
    settings = Settings()
    assert not settings.embedded
    assert settings.database.url.get_secret_value() == "postgresql+asyncpg://u:p@127.0.0.1:15432/db"
    assert "p@" not in settings.describe() and "p@" not in repr(settings)


def test_unknown_and_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROADCAST_DATABASE__URL", "mysql://nope")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("BROADCAST_DATABASE__URL")
    monkeypatch.setenv("BROADCAST_SERVER__PORT", "70000")
    with pytest.raises(ValidationError):
        Settings()


def test_content_limits_stop_at_what_the_kafka_envelope_carries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A content limit above the envelope's would accept broadcasts whose event cannot be written (a 500 on
    create, found by the slow-subscriber fault test): the setting is refused at start instead."""
    monkeypatch.setenv("BROADCAST_LIMITS__MAX_CONTENT_CHARS", "800100")
    with pytest.raises(ValidationError, match="max_content_chars"):
        Settings()
    monkeypatch.setenv("BROADCAST_LIMITS__MAX_CONTENT_CHARS", "100000")
    monkeypatch.setenv("BROADCAST_LIMITS__MAX_CATEGORY_CHARS", "101")
    with pytest.raises(ValidationError, match="max_category_chars"):
        Settings()
    monkeypatch.delenv("BROADCAST_LIMITS__MAX_CATEGORY_CHARS")
    broadcast = Broadcast(
        "b", "admin", "x" * Settings().limits.max_content_chars, TargetType.ALL, (), Priority.NORMAL,
        "c" * Settings().limits.max_category_chars, BroadcastStatus.ACTIVE, False, 0,
        datetime.now(UTC), datetime.now(UTC),
    )  # fmt: skip
    assert envelope.snapshot(broadcast).content == broadcast.content, "the largest allowed content fits its event"
