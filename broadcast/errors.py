"""The project's one error root and its shallow tree.

``BroadcastError``
├── ``ValidationError``     input that breaks a rule (HTTP 400/422)
│   └── ``RejectedByDatabaseError`` data the database refuses (constraint, value too long): never retried
├── ``NotFoundError``       a named thing does not exist (404)
├── ``ConflictError``       the request clashes with current state (409)
├── ``UnavailableError``    a dependency (database, Kafka, Redis) cannot serve now (503); retryable
│   ├── ``PublishError``    an event could not be made durable on the event log
│   └── ``CommitFailedError`` a consumer offset commit did not happen (rebalance, partition not assigned)
└── ``ConfigurationError``  settings or topics that cannot work; the process should not start

Adapters translate driver exceptions into these (``raise ... from exc``); only the HTTP layer turns them
into responses.
"""


class BroadcastError(Exception):
    """Root of every error this project raises on purpose."""


class ValidationError(BroadcastError):
    """Input that breaks a rule; the caller must change the request."""


class RejectedByDatabaseError(ValidationError):
    """The database refused the data itself (a constraint or a value out of range); retrying cannot help."""


class NotFoundError(BroadcastError):
    """A named entity does not exist."""


class ConflictError(BroadcastError):
    """The request clashes with the current state of an entity."""


class UnavailableError(BroadcastError):
    """A dependency cannot serve right now; the same request may succeed later."""


class PublishError(UnavailableError):
    """An event could not be made durable on the event log (not acknowledged by enough replicas).

    ``poison`` when the event log refused the record itself (too large, corrupt, a topic this principal may
    not write to): sending it again will not help, unlike a broker outage or a leader change.
    """

    def __init__(self, message: str, poison: bool = False) -> None:
        super().__init__(message)
        self.poison = poison


class ConfigurationError(BroadcastError):
    """Settings, schema or topics that cannot work; raised at start-up."""


class CommitFailedError(UnavailableError):
    """A consumer offset commit did not happen (the group rebalanced, or the partition is not assigned).

    Nothing is lost: the uncommitted records are delivered again, to this member or another, so a
    listener container logs it and carries on (processing is idempotent).
    """


def fqcn(exc: BaseException) -> str:
    """The exception's fully qualified class name (Python's counterpart of a Java FQCN): the dead-letter
    headers and the retry classification name exceptions this way."""
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
