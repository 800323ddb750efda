"""`RunEvents` delivered as signals to the run's `RunExecutionWorkflow`.

The workload API reports what a runner does through `RunEvents`. This
implementation turns each event into the signal of the same name that
`workflows.contract` defines, sent to `run-<run id>`. Signals are delivered
at least once: the workload API repeats an event when a runner retries, and
the workflow ignores a repeat from a runner that is no longer current.
"""

from __future__ import annotations

import logging

from vmflow.api.errors import NotFoundError, OrchestrationUnavailableError
from vmflow.api.events import FinishDetails, SuspendDetails
from vmflow.api.orchestration import Orchestrator
from vmflow.storage.models import TaskRunStatus
from workflows import contract

logger = logging.getLogger(__name__)


class TemporalRunEvents:
    """A `RunEvents` that signals `RunExecutionWorkflow`; raises `ApiError` when it cannot."""

    def __init__(self, orchestrator: Orchestrator | None = None) -> None:
        # None until the app has connected to Temporal; events before that get 503.
        self.orchestrator = orchestrator

    async def runner_started(self, run_id: str, runner_id: str, *, attempt: int) -> None:
        await self._send(
            run_id, runner_id, contract.SIGNAL_RUNNER_STARTED, contract.RunnerStarted(runner_id)
        )

    async def suspend_requested(self, run_id: str, runner_id: str, details: SuspendDetails) -> None:
        message = contract.SuspendRequested(
            runner_id=runner_id,
            waitpoint_id=details.waitpoint_id,
            kind=contract.WaitpointKind(details.waitpoint_kind.value),
            execution_snapshot_id=str(details.execution_snapshot_id),
            resume_at=details.resume_at,
        )
        await self._send(run_id, runner_id, contract.SIGNAL_SUSPEND_REQUESTED, message)

    async def runner_resumed(self, run_id: str, runner_id: str, *, waitpoint_id: str) -> None:
        message = contract.RunnerResumed(runner_id=runner_id, waitpoint_id=waitpoint_id)
        await self._send(run_id, runner_id, contract.SIGNAL_RUNNER_RESUMED, message)

    async def runner_finished(self, run_id: str, runner_id: str, details: FinishDetails) -> None:
        message = contract.RunnerFinished(
            runner_id=runner_id,
            ok=details.status is TaskRunStatus.COMPLETED,
            output=details.output,
            error=details.error,
        )
        await self._send(run_id, runner_id, contract.SIGNAL_RUNNER_FINISHED, message)

    async def _send(self, run_id: str, runner_id: str, signal: str, message: object) -> None:
        if self.orchestrator is None:
            raise OrchestrationUnavailableError(
                f"cannot send {signal} of run {run_id}: the API has not connected to Temporal yet"
            )
        try:
            await self.orchestrator.signal_run(run_id, signal, message)
        except NotFoundError as error:
            # A closed workflow has no use for the event, and failing here would
            # make the runner retry a request that can never succeed.
            logger.warning(
                "dropped %s of runner %s: the workflow of run %s has closed (%s)",
                signal,
                runner_id,
                run_id,
                error.detail,
            )
            return
        logger.info("sent %s of runner %s to run %s", signal, runner_id, run_id)
