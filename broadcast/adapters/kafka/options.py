"""Connection options every Kafka client of ours shares (producers, consumers, the admin and lag clients)."""

from __future__ import annotations

from typing import Any

from broadcast.core.settings import KafkaSettings


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by producers, consumers and the admin client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
        "metadata_max_age_ms": settings.metadata_max_age_ms,
    }
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    return options
