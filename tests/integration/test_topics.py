"""Topic provisioning on the real cluster: created as configured, idempotent, mismatches reported."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from broadcast.adapters.kafka.admin import MISSING, ensure_topics, verify_topics
from broadcast.core import constants
from broadcast.core.settings import KafkaSettings
from devstack.servers import Server, clean_env, free_port
from devstack.stack import StackInfo
from devstack.topics import delete_scratch_topics


async def test_provisioning_creates_every_topic_and_is_idempotent(stack: StackInfo, unique_name: str) -> None:
    settings = KafkaSettings(bootstrap_servers=stack.kafka_bootstrap, topic_prefix=f"{unique_name}.")
    names = [settings.topic(t) for t in constants.ALL_TOPICS]
    first = await ensure_topics(settings, names)
    assert [r.name for r in first] == names
    for report in first:
        assert report.created and report.ok, report
        assert (report.partitions, report.replication_factor, report.min_insync_replicas) == (10, 3, 2)
    second = await ensure_topics(settings, names)
    assert [(r.created, r.ok) for r in second] == [(False, True)] * len(names)


async def test_an_existing_topic_with_other_settings_is_reported(stack: StackInfo, unique_name: str) -> None:
    settings = KafkaSettings(bootstrap_servers=stack.kafka_bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=unique_name, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()
    [report] = await ensure_topics(settings, [unique_name])
    assert not report.created and not report.ok
    assert any("3 partitions, expected 10" in p for p in report.problems)
    assert any("replication factor 1, expected 3" in p for p in report.problems)
    assert len(report.problems) == 2  # min.insync.replicas inherits the cluster's 2, which is as configured


async def create_unsafe_topics(bootstrap: str, prefix: str) -> list[str]:
    """The topics as a careless development cluster has them: RF 1, min ISR 1, unclean leader election."""
    names = [f"{prefix}{t}" for t in constants.ALL_TOPICS]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        configs = {"min.insync.replicas": "1", "unclean.leader.election.enable": "true"}
        await admin.create_topics([NewTopic(n, 10, 1, topic_configs=configs) for n in names])
    finally:
        await admin.close()
    return names


async def test_run_refuses_to_start_on_misconfigured_topics_unless_told(
    stack: StackInfo, unique_name: str, tmp_path: Path
) -> None:
    prefix = f"{unique_name}."
    names = await create_unsafe_topics(stack.kafka_bootstrap, prefix)
    settings = KafkaSettings(bootstrap_servers=stack.kafka_bootstrap, topic_prefix=prefix)
    for _ in range(40):  # a new topic reaches every broker's metadata a moment after its creation
        reports = await verify_topics(settings, [*names, f"{prefix}nothing"])
        if all(r.partitions for r in reports[: len(names)]):
            break
        await asyncio.sleep(0.25)
    for report in reports[: len(names)]:
        assert any("replication factor 1, expected 3" in p for p in report.problems), report
        assert any("min.insync.replicas=1, expected 2" in p for p in report.problems), report
        assert any("unclean.leader.election.enable=true" in p for p in report.problems), report
    assert reports[len(names)].problems == (MISSING,)

    database = f"sqlite+aiosqlite:///{tmp_path}/b.db"  # migrated at start (PostgreSQL never is)
    env = clean_env(**{**stack.env(), "BROADCAST_KAFKA__TOPIC_PREFIX": prefix, "BROADCAST_DATABASE__URL": database})
    refused = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "broadcast", "run", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert "refusing to start on misconfigured topics" in output
    assert "unclean.leader.election.enable=true" in output

    allowed = Server({**env, "BROADCAST_KAFKA__ALLOW_UNSAFE_TOPICS": "true"}, tmp_path, roles="api,relay")
    try:
        allowed.wait_live()
        assert "starting on unsafe topics" in allowed.log.read_text()
    finally:
        allowed.stop()


async def test_scratch_topics_are_deleted_by_owner_and_other_topics_stay(stack: StackInfo) -> None:
    """``devstack.topics``: what the per-module tidy-up and the benchmark call; only the owners' topics go."""
    owners = ["t" + uuid.uuid4().hex[:10] for _ in range(2)]
    kept_owner, other = "t" + uuid.uuid4().hex[:10], f"keep-{uuid.uuid4().hex[:8]}"
    mine = [f"{o}.{constants.SELECTED_TOPIC}" for o in owners] + [f"{owners[0]}.{constants.GROUP_DLT_TOPIC}"]
    kept = [f"{kept_owner}.{constants.SELECTED_TOPIC}", other]
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 1, 1) for t in mine + kept])
        assert await delete_scratch_topics(stack.kafka_bootstrap, set(owners)) == 3
        deadline = asyncio.get_running_loop().time() + 30
        while set(mine) & set(listed := await admin.list_topics()):  # deletion completes in the background
            assert asyncio.get_running_loop().time() < deadline, f"still there: {set(mine) & set(listed)}"
            await asyncio.sleep(0.2)
        assert set(kept) <= set(listed)
        assert await delete_scratch_topics(stack.kafka_bootstrap, set()) == 0  # no owners: nothing at all
    finally:
        await admin.delete_topics(kept)
        await admin.close()
