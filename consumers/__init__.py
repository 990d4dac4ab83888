"""Kafka listener container, error handler and delivery consumers (Spring-Kafka style); see ARCHITECTURE.md."""
