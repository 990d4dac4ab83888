"""Adapters: the only modules that import vendor libraries (aiokafka, redis, SQLAlchemy)."""
