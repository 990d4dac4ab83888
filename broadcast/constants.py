"""Wire names in one place: Kafka topics and headers, Redis keys, SSE event names.

Anything that crosses a process boundary is named here so that producers, consumers, tests and the
docker-compose file agree on one spelling.
"""

from typing import Final

SELECTED_TOPIC: Final = "broadcast-user-service-selected"
GROUP_TOPIC: Final = "broadcast-user-service-group"
DLT_SUFFIX: Final = "-dlt"
SELECTED_DLT_TOPIC: Final = SELECTED_TOPIC + DLT_SUFFIX
GROUP_DLT_TOPIC: Final = GROUP_TOPIC + DLT_SUFFIX
BASE_TOPICS: Final = (SELECTED_TOPIC, GROUP_TOPIC)
ALL_TOPICS: Final = (SELECTED_TOPIC, GROUP_TOPIC, SELECTED_DLT_TOPIC, GROUP_DLT_TOPIC)

TOPIC_PARTITIONS: Final = 10
TOPIC_REPLICATION_FACTOR: Final = 3
TOPIC_MIN_INSYNC_REPLICAS: Final = 2

# The outbox is split into lanes by key hash; one relay at a time owns a lane, which keeps per-key order.
OUTBOX_LANES: Final = 32

DEFAULT_CONSUMER_GROUP: Final = "broadcast-delivery"
DEFAULT_DLT_CONSUMER_GROUP: Final = "broadcast-dlt"

# Kafka record headers (Spring's names where Spring defines one).
HEADER_EVENT_TYPE: Final = "event_type"
HEADER_SCHEMA_VERSION: Final = "schema_version"
HEADER_CORRELATION_ID: Final = "correlation_id"

# Redis keys and channels; every key is prefixed by the configured RedisSettings.key_prefix.
REDIS_PRESENCE_KEY: Final = "presence:{user_id}"
REDIS_INSTANCE_CHANNEL: Final = "instance:{instance_id}"
REDIS_GROUP_CHANNEL: Final = "group"


def dlt_topic(topic: str) -> str:
    """The dead-letter topic for ``topic`` (Spring's ``<topic>-dlt`` naming)."""
    return topic + DLT_SUFFIX


def instance_channel(instance_id: str) -> str:
    """The bus channel one instance listens on for its users' messages."""
    return REDIS_INSTANCE_CHANNEL.format(instance_id=instance_id)


# The server's own ASGI ``send`` (before any middleware wraps it), kept in the scope so a stream can abort
# the socket of a client that stopped reading (see ``broadcast/serve.py`` and ``sse/stream.py``).
RAW_SEND_SCOPE_KEY: Final = "broadcast.raw_send"
