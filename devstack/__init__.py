"""Local stack manager for tests and development: a real 3-node Kafka KRaft cluster, PostgreSQL and Redis.

The public API lives in :mod:`devstack.stack`; the ``stack`` CLI command in :mod:`devstack.cli`.
"""
