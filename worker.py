"""Temporal worker process."""
