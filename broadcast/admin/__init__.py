"""The admin REST API: broadcasts, the outbox view and users."""
