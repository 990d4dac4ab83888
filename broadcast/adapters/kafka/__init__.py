"""Kafka adapters (aiokafka): the log, producer, admin, lag, offsets and health."""
