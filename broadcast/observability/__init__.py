"""Logs, metrics, supervised tasks and the collector's tuning."""
