"""The transactional outbox's relay: durable rows to Kafka."""
