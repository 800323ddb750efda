"""The API's side of Temporal: starting, signaling and canceling vmflow's workflows.

Workflow, signal and queue names come from `workflows.contract`, the one place
both sides read them from. Every Temporal RPC error is translated here into an
`ApiError`, so routes never see a `temporalio` exception.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from opentelemetry import propagate
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from vmflow.api.errors import ConflictError, NotFoundError, OrchestrationUnavailableError
from vmflow.config import Settings
from workflows import contract
from workflows.contract import deploy_workflow_id, run_workflow_id, template_build_workflow_id

logger = logging.getLogger(__name__)


def _trace_context() -> dict[str, str]:
    """Return the current W3C trace context (`traceparent`, `tracestate`), empty outside a span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@dataclass(frozen=True)
class RunSpec:
    """Values from the database that a run's workflow starts with."""

    run_id: str
    deployment_id: str
    image: str
    cpu: float = 1.0
    memory_gb: float = 0.5


@dataclass(frozen=True)
class StartedWorkflow:
    workflow_id: str
    started: bool  # False when the id already existed, so an earlier request had started it


def _translate(error: RPCError | RuntimeError, workflow_id: str, action: str) -> Exception:
    if not isinstance(error, RPCError):
        # NOTE: temporalio 1.35 raises a plain RuntimeError("Failed client connect: …")
        # when a lazy client cannot reach the server; other RuntimeErrors are bugs.
        if "connect" not in str(error):
            raise error
        return OrchestrationUnavailableError(
            f"cannot {action} workflow {workflow_id!r}: Temporal is unreachable ({error}); "
            "check that Temporal runs at TEMPORAL_ADDRESS"
        )
    if error.status == RPCStatusCode.NOT_FOUND:
        return NotFoundError(
            "workflow_not_found",
            f"cannot {action}: workflow {workflow_id!r} does not exist or has already closed",
        )
    if error.status == RPCStatusCode.FAILED_PRECONDITION:
        return ConflictError(
            "workflow_closed", f"cannot {action}: workflow {workflow_id!r} {error}"
        )
    return OrchestrationUnavailableError(
        f"cannot {action} workflow {workflow_id!r}: Temporal returned {error.status.name}: "
        f"{error.message}; check that Temporal runs at TEMPORAL_ADDRESS"
    )


class Orchestrator:
    """Starts, signals and cancels vmflow's workflows through one Temporal client."""

    def __init__(
        self, client: Client, settings: Settings, *, task_queue: str = contract.MAIN_TASK_QUEUE
    ) -> None:
        self.client = client
        self.settings = settings
        self.task_queue = task_queue

    async def _start(self, workflow: str, arg: Any, workflow_id: str, **kwargs: Any) -> bool:
        # USE_EXISTING makes a retried request attach to the running workflow;
        # REJECT_DUPLICATE makes a retry after the workflow closed a no-op too.
        try:
            await self.client.start_workflow(
                workflow,
                arg,
                id=workflow_id,
                task_queue=self.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                **kwargs,
            )
        except WorkflowAlreadyStartedError:
            return False
        except (RPCError, RuntimeError) as error:
            raise _translate(error, workflow_id, f"start {workflow}") from error
        return True

    async def start_deploy(self, deployment_id: str, *, summary: str) -> StartedWorkflow:
        workflow_id = deploy_workflow_id(deployment_id)
        started = await self._start(
            contract.DEPLOY_TEMPLATE_WORKFLOW,
            contract.DeployTemplateInput(deployment_id=deployment_id),
            workflow_id,
            static_summary=summary,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(contract.SEARCH_DEPLOYMENT_ID, deployment_id)]
            ),
        )
        return StartedWorkflow(workflow_id, started)

    async def start_run(self, spec: RunSpec, *, summary: str) -> StartedWorkflow:
        workflow_id = run_workflow_id(spec.run_id)
        started = await self._start(
            contract.RUN_EXECUTION_WORKFLOW,
            contract.RunExecutionInput(
                run_id=spec.run_id,
                deployment_id=spec.deployment_id,
                image=spec.image,
                cpu=spec.cpu,
                memory_gb=spec.memory_gb,
                trace_context=_trace_context(),
                snapshots_enabled=self.settings.COMPUTE_SNAPSHOTS_ENABLED,
                snapshot_delay_ms=self.settings.COMPUTE_SNAPSHOT_DELAY_MS,
            ),
            workflow_id,
            static_summary=summary,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(contract.SEARCH_RUN_ID, spec.run_id),
                    SearchAttributePair(contract.SEARCH_DEPLOYMENT_ID, spec.deployment_id),
                ]
            ),
        )
        return StartedWorkflow(workflow_id, started)

    def run_handle(self, run_id: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(run_workflow_id(run_id))

    async def signal(self, workflow_id: str, signal: str, payload: Any) -> None:
        try:
            await self.client.get_workflow_handle(workflow_id).signal(signal, payload)
        except (RPCError, RuntimeError) as error:
            raise _translate(error, workflow_id, f"send {signal} to") from error

    async def signal_run(self, run_id: str, signal: str, payload: Any) -> None:
        await self.signal(run_workflow_id(run_id), signal, payload)

    async def signal_template_build(self, deployment_id: str, payload: Any) -> str:
        workflow_id = template_build_workflow_id(deployment_id)
        await self.signal(workflow_id, contract.SIGNAL_TEMPLATE_FINISHED, payload)
        return workflow_id

    async def complete_waitpoint(
        self, run_id: str, completion: contract.WaitpointCompleted
    ) -> contract.CompleteWaitpointResult:
        """Deliver a waitpoint's completion and wait until the run has accepted it."""
        workflow_id = run_workflow_id(run_id)
        try:
            return await self.client.get_workflow_handle(workflow_id).execute_update(
                contract.UPDATE_COMPLETE_WAITPOINT,
                completion,
                result_type=contract.CompleteWaitpointResult,
            )
        except WorkflowUpdateFailedError as error:
            raise ConflictError(
                "waitpoint_rejected",
                f"run workflow {workflow_id!r} rejected the completion of waitpoint "
                f"{completion.waitpoint_id!r}: {error.cause or error}",
            ) from error
        except (RPCError, RuntimeError) as error:
            raise _translate(error, workflow_id, "complete a waitpoint of") from error

    async def cancel_run(self, run_id: str) -> None:
        workflow_id = run_workflow_id(run_id)
        try:
            await self.client.get_workflow_handle(workflow_id).cancel()
        except (RPCError, RuntimeError) as error:
            raise _translate(error, workflow_id, "cancel") from error
