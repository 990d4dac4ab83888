"""Broadcast server."""
