"""Topic provisioning on the real cluster: created as configured, idempotent, mismatches reported."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from broadcast import constants
from broadcast.adapters.kafka_admin import ensure_topics
from broadcast.settings import KafkaSettings
from devstack.stack import StackInfo


async def test_provisioning_creates_the_four_topics_and_is_idempotent(stack: StackInfo, unique_name: str) -> None:
    settings = KafkaSettings(bootstrap_servers=stack.kafka_bootstrap, topic_prefix=f"{unique_name}.")
    names = [settings.topic(t) for t in constants.ALL_TOPICS]
    first = await ensure_topics(settings, names)
    assert [r.name for r in first] == names
    for report in first:
        assert report.created and report.ok, report
        assert (report.partitions, report.replication_factor, report.min_insync_replicas) == (10, 3, 2)
    second = await ensure_topics(settings, names)
    assert [(r.created, r.ok) for r in second] == [(False, True)] * 4


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
