"""Server-Sent Events: the per-instance hub, streams and routes; see ARCHITECTURE.md."""
