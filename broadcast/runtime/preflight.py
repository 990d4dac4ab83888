"""Checks a worker makes before its loops start: the Kafka topics it uses are as configured.

A topic with fewer replicas, a lower ``min.insync.replicas`` or unclean leader election enabled can lose
acknowledged records, so the roles that use the topics (relay, consumers, dlt) refuse to start on one, naming
each problem; ``kafka.allow_unsafe_topics`` turns the refusal into a warning (development clusters). A
cluster that does not answer within ``VERIFY_TIMEOUT_S`` is no reason to refuse: readiness reports it.
"""

from __future__ import annotations

import logging

from broadcast.adapters.kafka.admin import verify_topics
from broadcast.core import constants
from broadcast.core.settings import Settings
from broadcast.errors import BroadcastError, ConfigurationError

VERIFY_TIMEOUT_S = 10.0
TOPIC_ROLES = frozenset({"relay", "consumers", "dlt"})
log = logging.getLogger(__name__)


async def check_topics(settings: Settings, roles: frozenset[str]) -> None:
    """Raise ``ConfigurationError`` when a topic the ``roles`` use is missing or unsafe (see the module)."""
    if settings.kafka.embedded or not roles & TOPIC_ROLES:
        return
    names = [settings.kafka.topic(t) for t in constants.ALL_TOPICS]
    try:
        reports = await verify_topics(settings.kafka, names, timeout_s=VERIFY_TIMEOUT_S)
    except BroadcastError as exc:
        log.warning("could not verify the Kafka topics at start (starting; readiness shows Kafka): %s", exc)
        return
    problems = [f"{r.name} {p}" for r in reports for p in r.problems]
    if not problems:
        return
    if settings.kafka.allow_unsafe_topics:
        log.warning("starting on unsafe topics (KAFKA__ALLOW_UNSAFE_TOPICS): %s", "; ".join(problems))
        return
    raise ConfigurationError(
        "refusing to start on misconfigured topics: "
        + "; ".join(problems)
        + " (BROADCAST_KAFKA__ALLOW_UNSAFE_TOPICS=true starts anyway, for development clusters)"
    )
