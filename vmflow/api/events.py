"""Runner lifecycle events that the workload API sends to the orchestration.

The workload API records each runner message in the database and then calls
one `RunEvents` method. The production implementation signals the run's
`RunExecutionWorkflow`; tests use `RecordingRunEvents`. Each call happens
after the database commit, and a runner retries a request whose event call
failed, so an implementation must accept the same event more than once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from vmflow.storage.models import TaskRunStatus, WaitpointKind


@dataclass(frozen=True)
class SuspendDetails:
    """A runner's request to suspend at a waitpoint.

    `execution_snapshot_id` increases with every suspend of one runner
    process, so the newest request of a run is the one with the highest id.
    `resume_at` is set for a DURATION waitpoint, `timeout_at` for a TOKEN
    waitpoint with a timeout.
    """

    waitpoint_id: str
    execution_snapshot_id: int
    waitpoint_kind: WaitpointKind
    resume_at: datetime | None
    timeout_at: datetime | None


@dataclass(frozen=True)
class FinishDetails:
    """How a run ended: COMPLETED with `output`, or FAILED with `error`.

    `error` contains `name`, `message` and `traceback`.
    """

    status: TaskRunStatus
    output: Any = None
    error: dict[str, Any] | None = None


class RunEvents(Protocol):
    """Receiver of runner lifecycle events; every method may be called more than once."""

    async def runner_started(self, run_id: str, runner_id: str, *, attempt: int) -> None: ...

    async def suspend_requested(
        self, run_id: str, runner_id: str, details: SuspendDetails
    ) -> None: ...

    async def runner_resumed(self, run_id: str, runner_id: str, *, waitpoint_id: str) -> None: ...

    async def runner_finished(
        self, run_id: str, runner_id: str, details: FinishDetails
    ) -> None: ...


@dataclass(frozen=True)
class RecordedEvent:
    name: str
    run_id: str
    runner_id: str
    details: dict[str, Any]


@dataclass
class RecordingRunEvents:
    """A `RunEvents` that keeps every event in memory, for tests and runs without Temporal."""

    events: list[RecordedEvent] = field(default_factory=list)

    def _record(self, name: str, run_id: str, runner_id: str, **details: Any) -> None:
        self.events.append(RecordedEvent(name, run_id, runner_id, details))

    async def runner_started(self, run_id: str, runner_id: str, *, attempt: int) -> None:
        self._record("runner_started", run_id, runner_id, attempt=attempt)

    async def suspend_requested(self, run_id: str, runner_id: str, details: SuspendDetails) -> None:
        self._record("suspend_requested", run_id, runner_id, suspend=details)

    async def runner_resumed(self, run_id: str, runner_id: str, *, waitpoint_id: str) -> None:
        self._record("runner_resumed", run_id, runner_id, waitpoint_id=waitpoint_id)

    async def runner_finished(self, run_id: str, runner_id: str, details: FinishDetails) -> None:
        self._record("runner_finished", run_id, runner_id, finish=details)

    def for_run(self, run_id: str, name: str | None = None) -> list[RecordedEvent]:
        """Return the events of `run_id` in arrival order, only those called `name` if given."""
        return [
            event
            for event in self.events
            if event.run_id == run_id and (name is None or event.name == name)
        ]
