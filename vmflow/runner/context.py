"""The run context a task can read: which run, attempt and deployment, and the run's logger."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vmflow.runner.runtime import current_runtime


@dataclass(frozen=True)
class RunContext:
    """The run a task executes.

    `logger` writes to the run's log (and to the instance's stderr).
    `runner_id` is read from the runtime on every access, because a restore
    gives the runner a new id.
    """

    run_id: str
    task_id: str
    attempt: int
    deployment_id: str
    logger: logging.Logger

    @property
    def runner_id(self) -> str:
        return current_runtime().runner_id


_current: RunContext | None = None


def get_context() -> RunContext:
    """Return the context of the running task; raises `NoRunContextError` outside a run."""
    current_runtime()
    assert _current is not None, "the runtime is set but its run context is not"
    return _current


def set_context(context: RunContext | None) -> None:
    global _current
    _current = context
