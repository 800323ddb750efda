"""Telemetry tests reuse the workflow tests' server, database and harness fixtures."""

from tests.workflows.conftest import harness, sessions, workflow_env

__all__ = ["harness", "sessions", "workflow_env"]
