"""Activities that write what the workflows decide into the database, and read deployments.

Every write is idempotent, because Temporal may run an activity again after
a worker dies between the commit and the completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from vmflow.storage.db import session_scope
from vmflow.storage.models import (
    CheckpointType,
    Deployment,
    DeploymentStatus,
    TaskRun,
    TaskRunCheckpoint,
    TaskRunStatus,
    TemplateMode,
    Waitpoint,
    WaitpointStatus,
    utc_now,
)

# Feature flag of an organization that opts its deployments into shadow templates.
COMPUTE_ACCESS_FLAG = "hasComputeAccess"


@dataclass
class RunStatusInput:
    run_id: str
    status: str
    runner_id: str | None = None
    instance_id: str | None = None
    output: Any = None
    error: dict[str, Any] | None = None


@dataclass
class RunStatusResult:
    previous_status: str


@dataclass
class CheckpointInput:
    run_id: str
    snapshot_id: str
    runner_id: str | None
    waitpoint_id: str | None
    size_bytes: int | None = None


@dataclass
class CheckpointResult:
    checkpoint_id: str
    created: bool


@dataclass
class WaitpointCompletionInput:
    waitpoint_id: str
    output: Any = None
    timed_out: bool = False


@dataclass
class WaitpointCompletionResult:
    # False when the waitpoint was already complete or does not exist.
    updated: bool


@dataclass
class DeploymentContextInput:
    deployment_id: str


@dataclass
class DeploymentContextResult:
    deployment_id: str
    image: str
    workload_type: str | None
    has_compute_access: bool
    gateway_configured: bool
    shadow_rollout_pct: float


@dataclass
class DeploymentUpdateInput:
    deployment_id: str
    status: str
    template_mode: str | None = None
    template_id: str | None = None
    error_name: str | None = None
    error_message: str | None = None


@dataclass
class DeploymentUpdateResult:
    previous_status: str


def _not_found(kind: str, key: str) -> ApplicationError:
    return ApplicationError(
        f"{kind} {key!r} not found; the API creates it before starting the workflow",
        type="NotFound",
        non_retryable=True,
    )


class DatabaseActivities:
    """Database activities on one session factory; settings-derived values are passed in."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        gateway_configured: bool,
        shadow_rollout_pct: float,
    ) -> None:
        self._sessions = sessions
        self._gateway_configured = gateway_configured
        self._shadow_rollout_pct = shadow_rollout_pct

    # SQLAlchemy's session is synchronous, so these activities are sync
    # functions that the worker runs on its thread pool.

    @activity.defn(name="record_run_status")
    def record_run_status(self, input: RunStatusInput) -> RunStatusResult:
        """Set a run's status, current runner and instance, and its outcome when final."""
        status = TaskRunStatus(input.status)
        with session_scope(self._sessions) as session:
            run = session.get(TaskRun, input.run_id)
            if run is None:
                raise _not_found("task run", input.run_id)
            previous = run.status
            run.status = status
            if input.runner_id is not None:
                run.runner_id = input.runner_id
            if input.instance_id is not None:
                run.instance_id = input.instance_id or None
            if status == TaskRunStatus.EXECUTING and run.started_at is None:
                run.started_at = utc_now()
            if status.is_final:
                run.output = input.output
                run.error = input.error
                run.finished_at = run.finished_at or utc_now()
            return RunStatusResult(previous_status=previous.value)

    @activity.defn(name="record_checkpoint")
    def record_checkpoint(self, input: CheckpointInput) -> CheckpointResult:
        """Record a COMPUTE checkpoint whose location is the gateway's snapshot id."""
        with session_scope(self._sessions) as session:
            existing = session.scalars(
                select(TaskRunCheckpoint).where(
                    TaskRunCheckpoint.run_id == input.run_id,
                    TaskRunCheckpoint.type == CheckpointType.COMPUTE,
                    TaskRunCheckpoint.location == input.snapshot_id,
                )
            ).first()
            if existing is not None:
                return CheckpointResult(checkpoint_id=existing.id, created=False)
            if session.get(TaskRun, input.run_id) is None:
                raise _not_found("task run", input.run_id)
            checkpoint = TaskRunCheckpoint(
                run_id=input.run_id,
                type=CheckpointType.COMPUTE,
                location=input.snapshot_id,
                runner_id=input.runner_id,
                waitpoint_id=input.waitpoint_id,
                size_bytes=input.size_bytes,
            )
            session.add(checkpoint)
            session.flush()
            return CheckpointResult(checkpoint_id=checkpoint.id, created=True)

    @activity.defn(name="complete_waitpoint")
    def complete_waitpoint(self, input: WaitpointCompletionInput) -> WaitpointCompletionResult:
        """Mark a pending waitpoint completed (or timed out) with its output."""
        with session_scope(self._sessions) as session:
            waitpoint = session.get(Waitpoint, input.waitpoint_id)
            if waitpoint is None or waitpoint.status != WaitpointStatus.PENDING:
                return WaitpointCompletionResult(updated=False)
            waitpoint.status = (
                WaitpointStatus.TIMED_OUT if input.timed_out else WaitpointStatus.COMPLETED
            )
            waitpoint.output = input.output
            waitpoint.completed_at = utc_now()
            return WaitpointCompletionResult(updated=True)

    @activity.defn(name="load_deployment_context")
    def load_deployment_context(self, input: DeploymentContextInput) -> DeploymentContextResult:
        """Read what decides a deployment's template mode: workload type, flags, settings."""
        with session_scope(self._sessions) as session:
            deployment = session.get(Deployment, input.deployment_id)
            if deployment is None:
                raise _not_found("deployment", input.deployment_id)
            project = deployment.project
            group = project.default_worker_group
            return DeploymentContextResult(
                deployment_id=deployment.id,
                image=deployment.image,
                workload_type=group.workload_type.value if group is not None else None,
                has_compute_access=project.organization.has_feature(COMPUTE_ACCESS_FLAG),
                gateway_configured=self._gateway_configured,
                shadow_rollout_pct=self._shadow_rollout_pct,
            )

    @activity.defn(name="record_deployment")
    def record_deployment(self, input: DeploymentUpdateInput) -> DeploymentUpdateResult:
        """Set a deployment's status and template outcome."""
        status = DeploymentStatus(input.status)
        with session_scope(self._sessions) as session:
            deployment = session.get(Deployment, input.deployment_id)
            if deployment is None:
                raise _not_found("deployment", input.deployment_id)
            previous = deployment.status
            deployment.status = status
            if input.template_mode is not None:
                deployment.template_mode = TemplateMode(input.template_mode)
            if input.template_id is not None:
                deployment.template_id = input.template_id
            if input.error_name is not None:
                deployment.error_name = input.error_name
                deployment.error_message = input.error_message
            if status == DeploymentStatus.DEPLOYED and deployment.deployed_at is None:
                deployment.deployed_at = utc_now()
            return DeploymentUpdateResult(previous_status=previous.value)
