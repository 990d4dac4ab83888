"""Wire names in one place: Kafka topics and headers, Redis keys, SSE event names.

Anything that crosses a process boundary is named here so that producers, consumers, tests and the
docker-compose file agree on one spelling.
"""

from typing import Final

SELECTED_TOPIC: Final = "broadcast-user-service-selected"
GROUP_TOPIC: Final = "broadcast-user-service-group"
# HIGH and URGENT SELECTED broadcasts to at most PRIORITY_MAX_RECIPIENTS users: their own topic (and consumer),
# so they never queue behind a bulk broadcast's records in a partition (ARCHITECTURE.md, "Priority lanes").
SELECTED_PRIORITY_TOPIC: Final = "broadcast-user-service-selected-priority"
DLT_SUFFIX: Final = "-dlt"
SELECTED_DLT_TOPIC: Final = SELECTED_TOPIC + DLT_SUFFIX
GROUP_DLT_TOPIC: Final = GROUP_TOPIC + DLT_SUFFIX
SELECTED_PRIORITY_DLT_TOPIC: Final = SELECTED_PRIORITY_TOPIC + DLT_SUFFIX
BASE_TOPICS: Final = (SELECTED_TOPIC, GROUP_TOPIC, SELECTED_PRIORITY_TOPIC)
ALL_TOPICS: Final = (
    SELECTED_TOPIC,
    GROUP_TOPIC,
    SELECTED_PRIORITY_TOPIC,
    SELECTED_DLT_TOPIC,
    GROUP_DLT_TOPIC,
    SELECTED_PRIORITY_DLT_TOPIC,
)

TOPIC_PARTITIONS: Final = 10
TOPIC_REPLICATION_FACTOR: Final = 3
TOPIC_MIN_INSYNC_REPLICAS: Final = 2

# The outbox is split into lanes by key hash; one relay at a time owns a lane, which keeps per-key order.
OUTBOX_LANES: Final = 32
# Lanes OUTBOX_LANES .. OUTBOX_LANES + OUTBOX_PRIORITY_LANES - 1 hold the priority class's events (header
# HEADER_LANE_CLASS), worked by a relay loop of their own: an urgent row never waits behind a bulk backlog.
OUTBOX_PRIORITY_LANES: Final = 8
NORMAL_LANES: Final = range(OUTBOX_LANES)
PRIORITY_LANES: Final = range(OUTBOX_LANES, OUTBOX_LANES + OUTBOX_PRIORITY_LANES)
# A HIGH or URGENT SELECTED broadcast to more users than this is bulk: it takes the normal class.
PRIORITY_MAX_RECIPIENTS: Final = 1_000

DEFAULT_CONSUMER_GROUP: Final = "broadcast-delivery"
DLT_GROUP_SUFFIX: Final = "-dlt"  # the DLT consumer's group: the delivery group's name + this
# the priority topic's consumer group: the delivery group's name + this (its own, so that a bulk consumer's
# join, restart or slow heartbeat never stops it in a rebalance)
PRIORITY_GROUP_SUFFIX: Final = "-priority"

# Kafka record headers (Spring's names where Spring defines one).
HEADER_EVENT_TYPE: Final = "event_type"
HEADER_SCHEMA_VERSION: Final = "schema_version"
HEADER_CORRELATION_ID: Final = "correlation_id"
# On every event of the priority class (HIGH and URGENT broadcasts; see PRIORITY_MAX_RECIPIENTS): its outbox
# lane, kept by a dead outbox row or a dead letter, so a redrive goes back to the priority class.
HEADER_LANE_CLASS: Final = "broadcast_lane_class"
PRIORITY_CLASS: Final = b"priority"
# Set on a record an admin re-drove from the dead-letter store (value: the dead letter's id); the fault
# drill never fails such a record.
HEADER_REDRIVEN_FROM: Final = "broadcast_redriven_from"

# Spring Kafka's DeadLetterPublishingRecoverer headers (KafkaHeaders.DLT_*), so Java tooling reads our DLTs.
# partition is a 4-byte big-endian int, offset and timestamp 8-byte big-endian longs, the rest UTF-8.
DLT_HEADER_PREFIX: Final = "kafka_dlt-"
DLT_EXCEPTION_HEADER_PREFIX: Final = "kafka_dlt-exception-"
DLT_EXCEPTION_FQCN: Final = "kafka_dlt-exception-fqcn"
DLT_EXCEPTION_CAUSE_FQCN: Final = "kafka_dlt-exception-cause-fqcn"
DLT_EXCEPTION_MESSAGE: Final = "kafka_dlt-exception-message"
DLT_EXCEPTION_STACKTRACE: Final = "kafka_dlt-exception-stacktrace"
DLT_ORIGINAL_TOPIC: Final = "kafka_dlt-original-topic"
DLT_ORIGINAL_PARTITION: Final = "kafka_dlt-original-partition"
DLT_ORIGINAL_OFFSET: Final = "kafka_dlt-original-offset"
DLT_ORIGINAL_TIMESTAMP: Final = "kafka_dlt-original-timestamp"
DLT_ORIGINAL_TIMESTAMP_TYPE: Final = "kafka_dlt-original-timestamp-type"
DLT_ORIGINAL_CONSUMER_GROUP: Final = "kafka_dlt-original-consumer-group"

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
# the socket of a client that stopped reading (see ``broadcast/runtime/serve.py`` and ``sse/stream.py``).
RAW_SEND_SCOPE_KEY: Final = "broadcast.raw_send"

# What the versioned Kafka envelope (``envelope.BroadcastSnapshot``) can carry: the limits an operator may set
# (``LimitsSettings``) stop here, so an accepted broadcast always fits its event.
ENVELOPE_MAX_CONTENT_CHARS = 100_000
ENVELOPE_MAX_CATEGORY_CHARS = 100
