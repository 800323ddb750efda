"""Public contract of vmflow's workflows: ids, task queues, messages and search attributes.

The supervisor API, the CLI and the worker import these names; nothing else
should spell them. Every runner message carries the runner id that sent it,
and a run ignores messages from a runner that is not its current one, so a
runner left over from before a restore cannot change the run.

Payloads are dataclasses converted by Temporal's default JSON converter, so
new fields must have defaults to stay compatible with histories that lack them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from temporalio.common import SearchAttributeKey

# Task queues. Snapshot requests have their own queue, so the worker serving it
# can cap how many are in flight (COMPUTE_SNAPSHOT_DISPATCH_LIMIT activity slots).
MAIN_TASK_QUEUE = "vmflow-main"
SNAPSHOT_TASK_QUEUE = "vmflow-snapshots"

# Workflow type names, as registered by the worker.
RUN_EXECUTION_WORKFLOW = "RunExecutionWorkflow"
DEPLOY_TEMPLATE_WORKFLOW = "DeployTemplateWorkflow"
TEMPLATE_BUILD_WORKFLOW = "TemplateBuildWorkflow"

# Signals of RunExecutionWorkflow.
SIGNAL_RUNNER_STARTED = "runner_started"
SIGNAL_SUSPEND_REQUESTED = "suspend_requested"
SIGNAL_WAITPOINT_COMPLETED = "waitpoint_completed"
SIGNAL_SNAPSHOT_FINISHED = "snapshot_finished"
SIGNAL_RUNNER_RESUMED = "runner_resumed"
SIGNAL_RUNNER_FINISHED = "runner_finished"

# Queries and updates of RunExecutionWorkflow.
QUERY_RUN_STATE = "run_state"
UPDATE_COMPLETE_WAITPOINT = "complete_waitpoint"

# Signal and query of TemplateBuildWorkflow and DeployTemplateWorkflow.
SIGNAL_TEMPLATE_FINISHED = "template_finished"
QUERY_DEPLOYMENT_STATE = "deployment_state"

# Keyword search attributes; a server must have them registered (the dev
# server: `temporal server start-dev --search-attribute VmflowRunId=Keyword …`).
SEARCH_RUN_ID = SearchAttributeKey.for_keyword("VmflowRunId")
SEARCH_DEPLOYMENT_ID = SearchAttributeKey.for_keyword("VmflowDeploymentId")
SEARCH_INSTANCE_ID = SearchAttributeKey.for_keyword("VmflowInstanceId")
SEARCH_RUN_STATE = SearchAttributeKey.for_keyword("VmflowRunState")
SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[str], ...] = (
    SEARCH_RUN_ID,
    SEARCH_DEPLOYMENT_ID,
    SEARCH_INSTANCE_ID,
    SEARCH_RUN_STATE,
)

# Paths of the supervisor API that the gateway calls back, relative to VMFLOW_API_URL.
SNAPSHOT_CALLBACK_PATH = "/api/v1/compute/callbacks/snapshot"
TEMPLATE_CALLBACK_PATH = "/api/v1/compute/callbacks/template"

# Keys of the snapshot callback metadata; the API routes the callback with them.
METADATA_RUN_ID = "run_id"
METADATA_RUNNER_ID = "runner_id"
METADATA_SNAPSHOT_REQUEST_ID = "snapshot_request_id"
METADATA_DEPLOYMENT_ID = "deployment_id"


def run_workflow_id(run_id: str) -> str:
    """Return the id of the RunExecutionWorkflow of `run_id`."""
    return f"run-{run_id}"


def deploy_workflow_id(deployment_id: str) -> str:
    """Return the id of the DeployTemplateWorkflow of `deployment_id`."""
    return f"deploy-{deployment_id}"


def template_build_workflow_id(deployment_id: str) -> str:
    """Return the id of the TemplateBuildWorkflow of `deployment_id`."""
    return f"template-{deployment_id}"


def runner_id_for(run_id: str, generation: int) -> str:
    """Return the runner id of the `generation`-th instance of a run (1 for the first)."""
    return f"{run_id}-r{generation}"


class RunState(StrEnum):
    """State of a run as RunExecutionWorkflow tracks it (also VmflowRunState)."""

    PROVISIONING = "PROVISIONING"
    EXECUTING = "EXECUTING"
    # The runner requested a suspend, and the snapshot delay timer is running.
    SUSPENDING = "SUSPENDING"
    SNAPSHOTTING = "SNAPSHOTTING"
    # Snapshot taken and instance released; waiting for the waitpoint.
    SUSPENDED = "SUSPENDED"
    RESTORING = "RESTORING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def is_final(self) -> bool:
        return self in (RunState.COMPLETED, RunState.FAILED, RunState.CANCELED, RunState.TIMED_OUT)


class WaitpointKind(StrEnum):
    DURATION = "DURATION"
    TOKEN = "TOKEN"


class SnapshotStatus(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass
class RunExecutionInput:
    """Input of RunExecutionWorkflow, started with id `run_workflow_id(run_id)`.

    The starter fills the settings-derived fields from `vmflow.config.Settings`
    so that the workflow never reads the environment.
    """

    run_id: str
    deployment_id: str
    image: str
    cpu: float = 1.0
    memory_gb: float = 0.5
    # W3C trace context of the run (`traceparent`, `tracestate`); compute spans are
    # children of it.
    trace_context: dict[str, str] = field(default_factory=dict)
    snapshots_enabled: bool = True
    snapshot_delay_ms: int = 5_000
    # Maximum run time from the first start, across continue-as-new; None means none.
    max_duration_s: float | None = None
    # Seconds to wait for the snapshot callback before querying the gateway instead.
    snapshot_callback_timeout_s: float = 120.0
    # History length that triggers continue-as-new at the next quiet point; None
    # leaves it to the server's suggestion.
    continue_as_new_after_events: int | None = None
    # Task queue of the snapshot activity; its workers cap concurrent snapshot requests.
    snapshot_task_queue: str = SNAPSHOT_TASK_QUEUE
    # Set only by continue-as-new.
    carried: RunCarryOver | None = None


@dataclass
class RunCarryOver:
    """State a run carries into its next execution after continue-as-new."""

    state: RunState
    generation: int
    runner_id: str | None
    instance_id: str | None
    snapshot_id: str | None
    started_at: datetime
    pending_suspend: SuspendRequested | None = None
    completed_waitpoints: dict[str, WaitpointCompleted] = field(default_factory=dict)
    snapshot_count: int = 0
    restore_count: int = 0
    # Snapshot requests made so far; numbers each request id uniquely within the run.
    snapshot_requests: int = 0


@dataclass
class RunExecutionResult:
    run_id: str
    state: RunState
    output: Any = None
    error: dict[str, Any] | None = None
    snapshot_count: int = 0
    restore_count: int = 0


@dataclass
class RunnerStarted:
    """Signal `runner_started`: the runner in the current instance loaded the task."""

    runner_id: str


@dataclass
class SuspendRequested:
    """Signal `suspend_requested`: the task reached a waitpoint and may be snapshotted.

    A later request from the current runner replaces a pending one.
    """

    runner_id: str
    waitpoint_id: str
    kind: WaitpointKind
    # The runner's own id for the execution point it suspends at.
    execution_snapshot_id: str | None = None
    # When a DURATION waitpoint completes; the workflow's timer completes it.
    resume_at: datetime | None = None


@dataclass
class WaitpointCompleted:
    """Signal `waitpoint_completed` (or update `complete_waitpoint`): a waitpoint resolved."""

    waitpoint_id: str
    output: Any = None
    timed_out: bool = False


@dataclass
class SnapshotFinished:
    """Signal `snapshot_finished`: the gateway's snapshot callback, forwarded as received.

    `metadata` is the callback metadata the workflow sent (`run_id`,
    `runner_id`, `snapshot_request_id`). `received_at_ns` is when the API
    received the callback, in Unix epoch nanoseconds, and ends the
    compute.snapshot span.
    """

    status: SnapshotStatus
    instance_id: str
    snapshot_id: str | None = None
    error: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    duration_ms: float | None = None
    received_at_ns: int | None = None


@dataclass
class RunnerResumed:
    """Signal `runner_resumed`: the runner continues after `waitpoint_id`, in place or restored."""

    runner_id: str
    waitpoint_id: str | None = None


@dataclass
class RunnerFinished:
    """Signal `runner_finished`: the task returned (`ok`) or raised (`error`)."""

    runner_id: str
    ok: bool
    output: Any = None
    error: dict[str, Any] | None = None


@dataclass
class CompleteWaitpointResult:
    """Result of update `complete_waitpoint`."""

    # False when the waitpoint had already completed, so this call changed nothing.
    accepted: bool
    state: RunState


@dataclass
class RunStateView:
    """Result of query `run_state`."""

    run_id: str
    state: RunState
    runner_id: str | None
    instance_id: str | None
    snapshot_id: str | None
    waitpoint_id: str | None
    generation: int
    snapshot_count: int
    restore_count: int


@dataclass
class DeployTemplateInput:
    """Input of DeployTemplateWorkflow, started with id `deploy_workflow_id(deployment_id)`."""

    deployment_id: str
    # Resources the template is booted with; instances created from it get the same.
    cpu: float = 1.0
    memory_gb: float = 0.5
    # Seconds a template build may take; a required build that takes longer fails
    # the deployment.
    template_timeout_s: float = 1_800.0


@dataclass
class DeployTemplateResult:
    deployment_id: str
    template_mode: str
    status: str
    template_id: str | None = None
    error_name: str | None = None
    error_message: str | None = None


@dataclass
class TemplateBuildInput:
    """Input of TemplateBuildWorkflow, started with id `template_build_workflow_id(...)`."""

    deployment_id: str
    image: str
    cpu: float
    memory_gb: float
    timeout_s: float = 1_800.0
    # Whether the build records its template id on the deployment itself (shadow mode).
    record_on_deployment: bool = False


@dataclass
class TemplateBuildResult:
    deployment_id: str
    ok: bool
    template_id: str | None = None
    error: str | None = None
    duration_ms: float | None = None


@dataclass
class TemplateFinished:
    """Signal `template_finished`: the gateway's template callback, forwarded as received."""

    status: SnapshotStatus
    image: str
    template_id: str | None = None
    error: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    duration_ms: float | None = None
