"""The one settings object, read from ``BROADCAST_*`` environment variables.

Nested sections use ``__`` as delimiter, e.g. ``BROADCAST_KAFKA__BOOTSTRAP_SERVERS``. With nothing
configured the server runs the *embedded default*: an SQLite file database and the in-process event log,
bus and presence, in a single process. Settings are built once, in the composition root, and passed down.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broadcast.core import constants

DEV_JWT_SECRET = "dev-secret-change-me-dev-secret-change-me"  # noqa: S105 - a documented development value


class ServerSettings(BaseModel):
    """Where the HTTP server listens and how this instance names itself."""

    model_config = {"extra": "forbid"}

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    instance_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # SIGTERM to exit: streams get SERVER_SHUTDOWN and end, requests in flight finish, background loops
    # stop (consumers commit and leave their group), then the producer flushes; a loop still running when
    # the budget is spent is cancelled. Set the orchestrator's kill timeout above it.
    shutdown_grace_seconds: float = Field(default=25.0, ge=2, le=600)
    # Browser origins allowed to call the API cross-origin (exact "scheme://host[:port]"); none by default.
    cors_origins: list[str] = Field(default_factory=list)
    # the server's guard on request heads (broadcast/http/guard.py): past the size, 431; not complete in time
    # after its first byte, 408; more connections sending a head at once, 503 + Retry-After at accept
    max_header_bytes: int = Field(default=32_768, ge=4_096, le=1_048_576)
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    max_heads_in_flight: int = Field(default=4_096, ge=1)
    # Connections the kernel may hold for the server to accept (listen backlog; the kernel caps it at
    # net.core.somaxconn). A reconnect storm arrives in well under a second: a connect past a full backlog
    # has its SYN dropped and retried by the client's kernel after 1, 3, 7, 15, 31 s (uvicorn's 2,048 made
    # the last of 10,000 resuming clients wait a minute).
    listen_backlog: int = Field(default=16_384, ge=128, le=65_535)
    # Which priority class this process's relay and delivery roles work (ARCHITECTURE.md, "Priority lanes"):
    # "both"; "normal": the normal lanes' relay and the selected topic's consumer (the bulk work); "priority":
    # the priority lanes' relay and the priority and group topics' consumers (records that must not wait).
    # Running the bulk in processes of their own, at a lower OS priority, keeps URGENT messages fast while a
    # large broadcast saturates the CPU: one event loop has no priorities of its own.
    lane_classes: Literal["both", "normal", "priority"] = "both"


class KafkaSettings(BaseModel):
    """The Kafka cluster; an empty ``bootstrap_servers`` selects the in-process event log."""

    model_config = {"extra": "forbid"}

    bootstrap_servers: str = ""
    security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    client_id: str = "broadcast-server"
    topic_prefix: str = ""
    consumer_group: str = constants.DEFAULT_CONSUMER_GROUP
    partitions: int = Field(default=constants.TOPIC_PARTITIONS, ge=1)
    replication_factor: int = Field(default=constants.TOPIC_REPLICATION_FACTOR, ge=1)
    min_insync_replicas: int = Field(default=constants.TOPIC_MIN_INSYNC_REPLICAS, ge=1)
    # `run` verifies the topics before it starts (partitions, replication factor, min ISR as configured here,
    # unclean leader election off) and refuses to start otherwise; true starts anyway with a warning (a
    # development cluster, never production: a misconfigured topic can lose acknowledged records)
    allow_unsafe_topics: bool = False
    request_timeout_ms: int = Field(default=30_000, ge=1_000)
    # Every client refreshes its cluster metadata at least this often (aiokafka's default is 5 minutes):
    # the bound on how long a client can keep asking a broker that is no longer a partition's leader
    # (see broadcast/adapters/kafka/offsets.py). One small request per client per period.
    metadata_max_age_ms: int = Field(default=30_000, ge=1_000)
    # How long one publish (or one relay round's pipelined publish) may wait for acknowledgements; the
    # relay's lane lease must outlast it (RelaySettings.lease_seconds, default 3x).
    publish_timeout_seconds: float = Field(default=10.0, gt=0)
    # With idempotence aiokafka queues one batch per partition at a time, so batch size bounds throughput:
    # measured on the 3-broker stack, 100k records: 16 KiB (aiokafka's default) ~3.8k/s, 256 KiB ~22k/s,
    # 1 MB ~51k/s. 1 MB stays under the brokers' default message.max.bytes (1048588).
    producer_batch_bytes: int = Field(default=1_000_000, ge=16_384, le=1_000_000)
    producer_linger_ms: int = Field(default=5, ge=0, le=1_000)
    # A member that does not fetch for this long is put out of its group; the error handler's backoffs
    # pause the failing partition instead of sleeping, so they may exceed it.
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)

    @property
    def embedded(self) -> bool:
        return not self.bootstrap_servers.strip()

    @property
    def priority_consumer_group(self) -> str:
        """The priority topic's consumer group (its own: see ``constants.PRIORITY_GROUP_SUFFIX``)."""
        return self.consumer_group + constants.PRIORITY_GROUP_SUFFIX

    @property
    def dlt_consumer_group(self) -> str:
        """The DLT consumer's group (its own: it must not share partitions with the delivery listeners)."""
        return self.consumer_group + constants.DLT_GROUP_SUFFIX

    def topic(self, name: str) -> str:
        """The concrete topic name for a logical one (tests isolate themselves with a prefix)."""
        return self.topic_prefix + name


class DatabaseSettings(BaseModel):
    """The database URL (SQLAlchemy async form) and pool sizing."""

    model_config = {"extra": "forbid"}

    url: SecretStr = SecretStr("sqlite+aiosqlite:///./broadcast.db")
    schema_name: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    # 20 kept sessions and no overflow: under overload an overflow session is opened for one request and
    # closed at its return (TLS attempt, start-up, type introspection, statements prepared again), which cost
    # 15-20 % of a saturated server in a profile; a request waits for a kept one instead (``pool_timeout``)
    pool_size: int = Field(default=20, ge=1)
    max_overflow: int = Field(default=0, ge=0)
    # PostgreSQL ends a session left idle inside a transaction this long (its locks and snapshot with it):
    # the app's transactions are short and never await Kafka, so one idle this long is a bug or a stuck task
    idle_in_transaction_timeout_seconds: float = Field(default=60.0, gt=0)
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _async_driver(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw.startswith(("postgresql://", "postgres://")):
            raw = "postgresql+asyncpg://" + raw.split("://", 1)[1]
        elif raw.startswith("sqlite:///"):
            raw = "sqlite+aiosqlite:///" + raw.split(":///", 1)[1]
        if not raw.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("database url must be postgresql+asyncpg:// or sqlite+aiosqlite://")
        return SecretStr(raw)

    @property
    def dialect(self) -> Literal["postgresql", "sqlite"]:
        return "sqlite" if self.url.get_secret_value().startswith("sqlite") else "postgresql"


class RedisSettings(BaseModel):
    """Redis for presence and cross-instance push; no URL selects the in-process versions."""

    model_config = {"extra": "forbid"}

    url: SecretStr | None = None
    key_prefix: str = "broadcast:"
    presence_ttl_seconds: int = Field(default=30, ge=2)
    # Connections per process (the bus subscription holds one); callers wait for a free one beyond that.
    max_connections: int = Field(default=32, ge=2, le=10_000)

    @property
    def embedded(self) -> bool:
        return self.url is None or not self.url.get_secret_value().strip()


class LimitsSettings(BaseModel):
    """Input bounds: every request is checked against these before anything is written."""

    model_config = {"extra": "forbid"}

    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_content_chars: int = Field(default=10_000, ge=1, le=constants.ENVELOPE_MAX_CONTENT_CHARS)
    max_category_chars: int = Field(default=100, ge=1, le=constants.ENVELOPE_MAX_CATEGORY_CHARS)
    max_json_target_ids: int = Field(default=10_000, ge=1)
    max_csv_rows: int = Field(default=1_000_000, ge=1)
    max_csv_bytes: int = Field(default=64 * 1_048_576, ge=1024)
    max_user_id_chars: int = Field(default=128, ge=1, le=128)
    max_bulk_users: int = Field(default=10_000, ge=1)
    max_page_size: int = Field(default=500, ge=1)
    # Stream opens (and SSE tickets) per user and per client IP: a bucket of `burst`, refilled at `per_second`.
    connect_burst_per_user: int = Field(default=30, ge=1)
    connect_per_second_per_user: float = Field(default=5.0, gt=0)
    connect_burst_per_ip: int = Field(default=2_000, ge=1)
    connect_per_second_per_ip: float = Field(default=500.0, gt=0)


class RelaySettings(BaseModel):
    """The outbox relay and the scheduler."""

    model_config = {"extra": "forbid"}

    batch_size: int = Field(default=5_000, ge=1)
    lanes_per_claim: int = Field(default=8, ge=1)
    # > 2x KafkaSettings.publish_timeout_seconds (a round can publish that long); also how long a crashed
    # relay's lanes wait before another relay takes them over.
    lease_seconds: float = Field(default=30.0, gt=0)
    idle_poll_seconds: float = Field(default=0.2, gt=0)
    retention_seconds: float = Field(default=3_600.0, ge=0)
    # refusals of a record itself (too large, corrupt) before its row leaves its lane for the dead state
    # (/api/admin/outbox/dead); broker outages never count
    poison_attempts: int = Field(default=3, ge=1)
    scheduler_tick_seconds: float = Field(default=1.0, gt=0)


class SseSettings(BaseModel):
    """Server-Sent Events: per-connection bounds, heartbeats, catch-up and reconciliation."""

    model_config = {"extra": "forbid"}

    queue_size: int = Field(default=256, ge=1)
    max_connections_per_user: int = Field(default=5, ge=1)
    send_timeout_seconds: float = Field(default=10.0, gt=0)
    heartbeat_seconds: float = Field(default=15.0, gt=0)
    # a client gone without FIN or RST (half-open TCP) is detected and its stream and per-user slot freed
    # within about this long (TCP keepalive and TCP_USER_TIMEOUT on stream sockets; heartbeats are the data)
    dead_peer_seconds: float = Field(default=60.0, ge=2, le=900)
    # a connect's catch-up: the newest ``replay_limit`` messages and at most ``replay_bytes`` of frames (at least
    # one message); past either, RESYNC tells the client to refetch its inbox for the rest
    replay_limit: int = Field(default=1_000, ge=1)
    replay_bytes: int = Field(default=1_048_576, ge=1_024)
    reconcile_seconds: float = Field(default=5.0, gt=0)
    delivered_flush_seconds: float = Field(default=0.2, gt=0)
    # A reconnect storm queues here, not in the database pool: connects doing their reads at once, connects
    # allowed to wait, and how long; past either bound a connect is refused at once with 503 + Retry-After.
    connect_concurrency: int = Field(default=200, ge=1)
    connect_queue: int = Field(default=5_000, ge=0)
    connect_wait_seconds: float = Field(default=10.0, gt=0)


class RetrySettings(BaseModel):
    """One listener's error handling: ``max_attempts`` deliveries with exponential backoff, then the DLT."""

    model_config = {"extra": "forbid"}

    max_attempts: int = Field(default=3, ge=1)
    initial_backoff_seconds: float = Field(default=1.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    max_backoff_seconds: float = Field(default=10.0, ge=0)


class ConsumerSettings(BaseModel):
    """Per-listener retry policies (e.g. ``BROADCAST_CONSUMERS__SELECTED__MAX_ATTEMPTS=5``).

    The DLT listener retries a record it cannot store (the database is down) for as long as that lasts:
    the dead-letter store is the last stop, nothing is dropped after it.
    """

    model_config = {"extra": "forbid"}

    selected: RetrySettings = Field(default_factory=RetrySettings)
    group: RetrySettings = Field(default_factory=RetrySettings)
    dlt: RetrySettings = Field(
        default_factory=lambda: RetrySettings(max_attempts=1_000_000_000, max_backoff_seconds=30.0)
    )


class TestingSettings(BaseModel):
    """Operator drills; everything here is off by default."""

    model_config = {"extra": "forbid"}

    fault_drill_enabled: bool = False
    max_drill_seconds: int = Field(default=3_600, ge=1)
    # The relay's failpoint, for the fault suite (RELIABILITY #7 b): once the event log has acknowledged this
    # many records of this process's relay, the process ends at once (``os._exit(137)``, as a SIGKILL would)
    # after the acknowledgement and before the rows are marked published. None: off.
    relay_exit_after_acks: int | None = Field(default=None, ge=1)
    # Before each of its publishes the relay waits a random 0..N ms (RELIABILITY #18: two relays racing with
    # random per-publish delays must still keep per-key order). 0: off.
    relay_publish_delay_ms: int = Field(default=0, ge=0, le=10_000)
    # The delivery listeners take this many ms per record (waited before each slice of 50 records of a batch),
    # so a fault test can rebalance the group while a large broadcast is still being consumed (RELIABILITY
    # #11). 0: off.
    delivery_record_delay_ms: int = Field(default=0, ge=0, le=1_000)


class ObservabilitySettings(BaseModel):
    """Logs, metrics and readiness thresholds."""

    model_config = {"extra": "forbid"}

    # "auto": human-readable text on a terminal, one JSON object per line otherwise.
    log_format: Literal["auto", "json", "text"] = "auto"
    # One INFO line per delivery record handled (with correlation, broadcast and user ids); off = DEBUG.
    delivery_log: bool = True
    # How often the shared gauges (outbox, pending, dead letters, consumer lag, readiness) are sampled.
    sample_seconds: float = Field(default=10.0, gt=0)
    # Readiness: the producer has had no acknowledgement while publishing failed for this long ("wedged").
    producer_wedge_seconds: float = Field(default=60.0, gt=0)
    # Readiness: a listener holds records it has not advanced on (a handler in hand, or lag on its
    # partitions with nothing handled) for this long.
    consumer_stall_seconds: float = Field(default=120.0, gt=0)
    # When set, GET /metrics requires "Authorization: Bearer <metrics_token>".
    metrics_token: SecretStr | None = None


class AuthSettings(BaseModel):
    """Bearer-token verification and SSE tickets. The dev secret is refused when ``environment=production``.

    HS256 verifies with ``jwt_secret``; RS256/ES256 with ``public_key`` (PEM) or the keys at ``jwks_url``.
    ``exp``, ``sub``, ``aud`` and ``iss`` are required; roles come from ``roles_claim``.
    """

    model_config = {"extra": "forbid"}

    algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)
    public_key: SecretStr | None = None
    jwks_url: str | None = Field(default=None, pattern=r"^https?://")
    key_id: str | None = None
    audience: str = Field(default="broadcast-server", min_length=1)
    issuer: str = Field(default="broadcast-dev", min_length=1)
    roles_claim: str = Field(default="roles", min_length=1)
    admin_role: str = Field(default="admin", min_length=1)
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    max_token_bytes: int = Field(default=8_192, ge=512, le=65_536)
    # the JOSE ``typ`` header values taken as an access token (RFC 8725 §3.11: explicit typing keeps an ID token,
    # a logout token or a SET signed by the same issuer from being used as one); compared case-insensitively,
    # ``application/`` optional. A token without ``typ`` is accepted unless ``require_typ``.
    accepted_types: tuple[str, ...] = ("JWT", "at+jwt")
    require_typ: bool = False
    ticket_ttl_seconds: int = Field(default=30, ge=1, le=300)

    @model_validator(mode="after")
    def _key_source(self) -> AuthSettings:
        if self.algorithm != "HS256" and self.public_key is None and self.jwks_url is None:
            raise ValueError(f"auth.algorithm {self.algorithm} needs auth.public_key (PEM) or auth.jwks_url")
        if self.jwks_url and not self.jwks_url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise ValueError("auth.jwks_url must be https:// (plain http only on the loopback)")
        if self.algorithm == "HS256" and len(self.jwt_secret.get_secret_value().encode()) < 32:
            raise ValueError("auth.jwt_secret must be at least 32 bytes")
        return self

    @property
    def dev_secret_in_use(self) -> bool:
        return self.algorithm == "HS256" and self.jwt_secret.get_secret_value() == DEV_JWT_SECRET

    def public_key_pem(self) -> str:
        assert self.public_key is not None
        return self.public_key.get_secret_value()


class Settings(BaseSettings):
    """Everything the server needs to start, built once by the composition root."""

    model_config = SettingsConfigDict(
        env_prefix="BROADCAST_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    environment: Literal["development", "production"] = "development"
    server: ServerSettings = Field(default_factory=ServerSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    sse: SseSettings = Field(default_factory=SseSettings)
    consumers: ConsumerSettings = Field(default_factory=ConsumerSettings)
    testing: TestingSettings = Field(default_factory=TestingSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)

    @model_validator(mode="after")
    def _no_dev_secret_in_production(self) -> Settings:
        if self.environment == "production" and self.auth.dev_secret_in_use:
            raise ValueError(
                "environment=production refuses the development JWT secret: set BROADCAST_AUTH__JWT_SECRET "
                "(32+ random bytes) or BROADCAST_AUTH__ALGORITHM with BROADCAST_AUTH__PUBLIC_KEY/JWKS_URL"
            )
        return self

    @model_validator(mode="after")
    def _lane_classes_need_shared_components(self) -> Settings:
        if self.server.lane_classes != "both" and self.kafka.embedded:
            raise ValueError(
                f"server.lane_classes={self.server.lane_classes} leaves the other class to another process, and "
                "the embedded event log has none: use it with Kafka (BROADCAST_KAFKA__BOOTSTRAP_SERVERS)"
            )
        return self

    @property
    def embedded(self) -> bool:
        """True when every component runs in this process (the single-process default)."""
        return self.kafka.embedded and self.redis.embedded and self.database.dialect == "sqlite"

    def describe(self) -> str:
        """One line naming the components in use, without secrets (for the start-up banner)."""
        kafka = "in-process event log" if self.kafka.embedded else f"Kafka {self.kafka.bootstrap_servers}"
        redis = "in-process bus/presence" if self.redis.embedded else "Redis"
        return f"{kafka}; {self.database.dialect} database; {redis}"
