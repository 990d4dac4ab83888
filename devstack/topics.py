"""Deleting the topics tests and benchmarks create on the shared stack, so the cluster stays small.

Every test and benchmark run provisions its own topics under a unique-name prefix (six topics of 10
partitions, RF 3). Left behind, they add up: on a stack kept across sessions 359 stale topics (~3,700
partitions per broker) took the brokers from ~3.6 s to 14-31 s of CPU for 20,000 targeted messages, since
each follower fetch and metadata response walks every partition. Tests delete theirs per module, the
benchmark per scenario.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from aiokafka.admin import AIOKafkaAdminClient

# the unique-name prefixes: ``tests.conftest.unique_name``'s ``t`` + 10 hex digits, the benchmark's ``bench_…``
# (``bench.servers.stack_env``) and ad-hoc profiling runs' ``prof_…``
SCRATCH_TOPIC = re.compile(r"^(t[0-9a-f]{10}|bench_\w+|prof_\w+)([.-].*)?$")
DELETE_BATCH = 50


async def delete_scratch_topics(bootstrap: str, owners: Collection[str] | None = None) -> int:
    """Delete the scratch topics of ``owners`` (unique-name prefixes; None: of any owner); how many.

    With ``owners``, only those prefixes' topics go, so concurrent sessions on the same stack keep theirs."""
    if owners is not None and not owners:
        return 0
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=60_000)
    await admin.start()
    try:
        names = [
            t
            for t in await admin.list_topics()
            if (m := SCRATCH_TOPIC.match(t)) and (owners is None or m.group(1) in owners)
        ]
        for start in range(0, len(names), DELETE_BATCH):
            await admin.delete_topics(names[start : start + DELETE_BATCH])
        return len(names)
    finally:
        await admin.close()
