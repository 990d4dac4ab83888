"""Topic provisioning: create the broadcast topics and their DLTs, verify the ones that exist.

Idempotent: missing topics are created with the configured partitions, replication factor and
``min.insync.replicas``; existing topics with other settings are reported as mismatches, not ignored.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from broadcast.adapters.kafka.options import client_options
from broadcast.core.settings import KafkaSettings
from broadcast.errors import UnavailableError

TOPIC_ALREADY_EXISTS = 36
MIN_ISR = "min.insync.replicas"
UNCLEAN = "unclean.leader.election.enable"
MISSING = (
    "does not exist (or this principal may not see it: no Describe ACL): run `broadcast-server topics`, or grant"
    " the ACLs"
)


@dataclass(frozen=True)
class TopicReport:
    """What provisioning found or did for one topic; ``problems`` empty means it is as configured."""

    name: str
    created: bool
    partitions: int
    replication_factor: int
    min_insync_replicas: int | None
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


async def ensure_topics(settings: KafkaSettings, names: Sequence[str], timeout_s: float = 60.0) -> list[TopicReport]:
    """Create what is missing among ``names`` and report each topic's actual settings."""
    async with _admin(settings, timeout_s, "topic provisioning") as admin:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        created = await _create(admin, settings, missing) if missing else set()
        return await _describe(admin, settings, names, created)


async def verify_topics(settings: KafkaSettings, names: Sequence[str], timeout_s: float = 30.0) -> list[TopicReport]:
    """Each of ``names`` as it is, created by nobody: what ``run`` checks before it starts."""
    async with _admin(settings, timeout_s, "verifying topics") as admin:
        existing = set(await admin.list_topics())
        present = [n for n in names if n in existing]
        found = {r.name: r for r in await _describe(admin, settings, present, set())} if present else {}
        return [found.get(n) or TopicReport(n, False, 0, 0, None, (MISSING,)) for n in names]


@asynccontextmanager
async def _admin(settings: KafkaSettings, timeout_s: float, what: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client for at most ``timeout_s``; Kafka's errors become ``UnavailableError``."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            try:
                yield admin
            finally:
                await admin.close()
    except (KafkaError, TimeoutError, OSError) as exc:
        raise UnavailableError(f"{what} failed on {settings.bootstrap_servers}: {exc!r}") from exc


async def _create(admin: AIOKafkaAdminClient, settings: KafkaSettings, names: Sequence[str]) -> set[str]:
    """Create ``names``; returns those this call created (another creator may have won the race)."""
    topics = [
        NewTopic(
            name=name,
            num_partitions=settings.partitions,
            replication_factor=settings.replication_factor,
            topic_configs={"min.insync.replicas": str(settings.min_insync_replicas)},
        )
        for name in names
    ]
    response: Any = await admin.create_topics(topics)
    created = set()
    for topic_error in response.topic_errors:
        name, code = topic_error[0], topic_error[1]
        if code == 0:
            created.add(name)
        elif code != TOPIC_ALREADY_EXISTS:
            message = topic_error[2] if len(topic_error) > 2 else ""
            raise UnavailableError(f"creating topic {name} failed with error code {code}: {message}")
    return created


async def _describe(
    admin: AIOKafkaAdminClient, settings: KafkaSettings, names: Sequence[str], created: set[str]
) -> list[TopicReport]:
    described: dict[str, Any] = {}
    for _ in range(20):  # metadata of freshly created topics can lag a moment behind
        described = {t["topic"]: t for t in await admin.describe_topics(list(names))}
        if all(described.get(n, {}).get("error_code") == 0 and described[n]["partitions"] for n in names):
            break
        await asyncio.sleep(0.5)
    configs = await _configs(admin, names)
    for _ in range(20):  # so can a new topic's config on the broker that answers
        if all(configs.get(n, {}).get(MIN_ISR) is not None for n in names):
            break
        await asyncio.sleep(0.5)
        configs = await _configs(admin, names)
    min_isr = {n: _int(configs.get(n, {}).get(MIN_ISR)) for n in names}
    reports = []
    for name in names:
        topic = described.get(name, {})
        partitions = topic.get("partitions") or []
        rf = min((len(p["replicas"]) for p in partitions), default=0)
        problems = []
        if len(partitions) != settings.partitions:
            problems.append(f"has {len(partitions)} partitions, expected {settings.partitions}")
        if rf != settings.replication_factor:
            problems.append(f"has replication factor {rf}, expected {settings.replication_factor}")
        if min_isr.get(name) != settings.min_insync_replicas:
            problems.append(f"has min.insync.replicas={min_isr.get(name)}, expected {settings.min_insync_replicas}")
        if configs.get(name, {}).get(UNCLEAN) == "true":
            problems.append(f"has {UNCLEAN}=true: a lagging replica may become leader and lose acknowledged records")
        reports.append(TopicReport(name, name in created, len(partitions), rf, min_isr.get(name), tuple(problems)))
    return reports


async def _configs(admin: AIOKafkaAdminClient, names: Sequence[str]) -> dict[str, dict[str, str | None]]:
    """The verified settings of each topic (``min.insync.replicas``, unclean leader election)."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, n, configs=None) for n in names]
    result: dict[str, dict[str, str | None]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            name, entries = resource[3], resource[4]
            for entry in entries:
                if entry[0] in (MIN_ISR, UNCLEAN):
                    result.setdefault(name, {})[entry[0]] = entry[1]
    return result


def _int(value: str | None) -> int | None:
    return int(value) if value is not None else None
