"""The local Kafka cluster id: a base64url UUID the storage tool can take as an argument."""

from __future__ import annotations

import uuid

import pytest

from devstack import kafka


def test_an_id_starting_with_a_dash_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([uuid.UUID(bytes=b"\xf8" + b"\x00" * 15), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    assert kafka.new_cluster_id() == "AQEBAQEBAQEBAQEBAQEBAQ"  # the first draw encodes as "-AAAAAAAAAAAAAAAAAAAAA"
