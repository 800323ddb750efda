"""Request and response bodies of the supervisor API's platform routes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from vmflow.api.json_values import JsonValue
from vmflow.storage.models import (
    CheckpointType,
    DeploymentStatus,
    TaskRunStatus,
    TemplateMode,
    WaitpointKind,
    WaitpointStatus,
    WorkloadType,
)

Slug = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
TaskId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][\w.:-]*$")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeploymentFinalizeRequest(_Request):
    """A built image to deploy; posting the same project and version again is a no-op."""

    project: Slug = Field(description="Project slug; created on first use.")
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.+-]*$")
    image: str = Field(min_length=1, max_length=512, description="Image reference, name:tag.")
    tasks: list[TaskId] = Field(
        min_length=1, max_length=1000, description="Ids of the tasks the image defines."
    )
    organization: Slug = Field(default="default", description="Organization slug of a new project.")
    workload_type: WorkloadType = Field(
        default=WorkloadType.MICROVM,
        description="Workload type of a new project's default worker group; "
        "MICROVM builds a template before the deployment is DEPLOYED.",
    )


class DeploymentResponse(BaseModel):
    id: str
    project: str
    version: str
    image: str
    tasks: list[str]
    status: DeploymentStatus
    template_mode: TemplateMode | None
    template_id: str | None
    error_name: str | None
    error_message: str | None
    created_at: datetime
    deployed_at: datetime | None
    workflow_id: str


class TriggerRequest(_Request):
    payload: JsonValue = Field(default=None, description="JSON value passed to the task.")
    project: Slug | None = Field(
        default=None, description="Run on this project's newest DEPLOYED deployment."
    )
    deployment_id: str | None = Field(default=None, max_length=64)
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="A second trigger with the same key returns the first run.",
    )


class TriggerResponse(BaseModel):
    run_id: str
    workflow_id: str
    task_id: str
    deployment_id: str
    status: TaskRunStatus
    created: bool = Field(description="False when the idempotency key matched an earlier run.")


class WaitpointCompleteRequest(_Request):
    output: JsonValue = Field(default=None, description="JSON value the waiting task resumes with.")


class WaitpointResponse(BaseModel):
    id: str
    run_id: str
    kind: WaitpointKind
    status: WaitpointStatus
    output: Any = None
    resume_at: datetime | None = None
    timeout_at: datetime | None = None
    created_at: datetime
    completed_at: datetime | None = None


class CheckpointResponse(BaseModel):
    id: str
    type: CheckpointType
    location: str
    runner_id: str | None
    waitpoint_id: str | None
    size_bytes: int | None
    created_at: datetime


class RunResponse(BaseModel):
    id: str
    task_id: str
    deployment_id: str
    status: TaskRunStatus
    payload: Any = None
    output: Any = None
    error: dict[str, Any] | None = None
    attempt: int
    runner_id: str | None
    instance_id: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    workflow_id: str
    waitpoints: list[WaitpointResponse] = Field(default_factory=list)
    checkpoints: list[CheckpointResponse] = Field(default_factory=list)


class RunListResponse(BaseModel):
    runs: list[RunResponse]
    next_offset: int | None = Field(description="Offset of the next page, None on the last page.")


class LogLineResponse(BaseModel):
    id: int
    runner_id: str | None
    level: str
    message: str
    logged_at: datetime


class RunLogResponse(BaseModel):
    run_id: str
    lines: list[LogLineResponse]
    next_after: int | None = Field(
        description="Pass as `after` to read lines written since; None when no line was returned."
    )


class CallbackAccepted(BaseModel):
    accepted: bool = True
    workflow_id: str


class ErrorResponse(BaseModel):
    """Body of every 4xx and 5xx response."""

    error: str = Field(description="Short machine-readable name, such as run_not_found.")
    detail: str = Field(description="What is wrong and how to fix it.")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Each invalid field, for validation errors."
    )


def error_responses(*status_codes: int) -> dict[int | str, dict[str, object]]:
    """Build a route's OpenAPI `responses` that document `ErrorResponse` for each status code."""
    return {code: {"model": ErrorResponse} for code in status_codes}
