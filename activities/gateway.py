"""Activities that call the compute gateway: instances, snapshots and templates.

Each activity wraps one gateway call. Gateway errors become Temporal
`ApplicationError`s whose type is the `ComputeError` subclass name.
Retryable ones (transport errors, timeouts, 408, 425, 429, 5xx) are retried
with the caller's backoff. The rest (4xx validation errors, malformed
responses) are non-retryable and carry the HTTP status in `details`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.tokens import TokenIssuer
from vmflow.compute import ComputeClient, ComputeError, ComputeHTTPError, strip_image_digest
from vmflow.compute.models import (
    CallbackTarget,
    InstanceCreateRequest,
    InstanceState,
    SnapshotRequest,
    SnapshotRestoreRequest,
    TemplateCreateRequest,
)
from workflows.contract import (
    METADATA_DEPLOYMENT_ID,
    METADATA_RUN_ID,
    METADATA_RUNNER_ID,
    METADATA_SNAPSHOT_REQUEST_ID,
    SNAPSHOT_CALLBACK_PATH,
    TEMPLATE_CALLBACK_PATH,
)

logger = logging.getLogger(__name__)

# Error type of a gateway that is not configured (COMPUTE_GATEWAY_URL unset).
GATEWAY_NOT_CONFIGURED = "GatewayNotConfigured"


@dataclass
class ProvisionInput:
    run_id: str
    deployment_id: str
    runner_id: str
    image: str
    cpu: float
    memory_gb: float


@dataclass
class ProvisionResult:
    instance_id: str
    runner_id: str
    # Unix epoch nanoseconds around the gateway call.
    start_ns: int
    end_ns: int
    gateway_timing: dict[str, Any] | None = None


@dataclass
class SnapshotRequestInput:
    run_id: str
    runner_id: str
    instance_id: str
    request_id: str


@dataclass
class SnapshotRequestResult:
    requested_at_ns: int
    accepted_at_ns: int
    # The new snapshot's id when the gateway names it in its 202 response.
    snapshot_id: str | None = None


@dataclass
class InstanceStateInput:
    instance_id: str
    # The snapshot the gateway named when it accepted the request, if any.
    snapshot_id: str | None = None
    # When set and the instance has exited, also read this many bytes of its output's end.
    log_tail_bytes: int | None = None


@dataclass
class InstanceStateResult:
    # The gateway's instance state, or None when the instance does not exist (404).
    state: str | None
    # Latest snapshot of the instance, when the gateway reports one.
    snapshot_id: str | None = None
    snapshot_state: str | None = None
    # The process's exit code, when the gateway reports one.
    exit_code: int | None = None
    # The end of the instance's output, read only for an exited instance on request.
    log_tail: str | None = None


@dataclass
class RestoreInput:
    run_id: str
    deployment_id: str
    snapshot_id: str
    runner_id: str
    cpu: float
    memory_gb: float


@dataclass
class RestoreResult:
    instance_id: str
    runner_id: str
    start_ns: int
    end_ns: int
    gateway_timing: dict[str, Any] | None = None


@dataclass
class DeleteInstanceInput:
    instance_id: str


@dataclass
class DeleteSnapshotInput:
    snapshot_id: str


@dataclass
class DeleteResult:
    # False when the gateway no longer had it (404), which counts as deleted.
    deleted: bool


@dataclass
class TemplateCreateInput:
    deployment_id: str
    image: str
    cpu: float
    memory_gb: float


@dataclass
class TemplateCreateResult:
    image: str
    requested_at_ns: int
    # Set when the gateway built the template in the foreground and returned it.
    template_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def to_application_error(error: ComputeError) -> ApplicationError:
    """Translate a gateway error for Temporal, non-retryable unless `error.retryable`."""
    return ApplicationError(
        str(error),
        error.status,
        type=type(error).__name__,
        non_retryable=not error.retryable,
    )


async def _delete(request: Awaitable[None]) -> DeleteResult:
    """Await a gateway delete; a 404 means it was already gone, other errors are raised."""
    try:
        await request
    except ComputeError as error:
        if _is_not_found(error):
            return DeleteResult(deleted=False)
        raise to_application_error(error) from error
    return DeleteResult(deleted=True)


def _is_not_found(error: ComputeError) -> bool:
    return isinstance(error, ComputeHTTPError) and error.status == 404


def _log_instance_created(
    result: ProvisionResult | RestoreResult,
    *,
    run_id: str,
    deployment_id: str,
    image: str | None,
    restored_from: str | None,
) -> None:
    """Log one wide line per instance creation, so one search finds every id and timing."""
    info = activity.info()
    fields = {
        "event": "instance.created",
        "run_id": run_id,
        "deployment_id": deployment_id,
        "runner_id": result.runner_id,
        "instance_id": result.instance_id,
        "image": image,
        "restored_from_snapshot_id": restored_from,
        "workflow_id": info.workflow_id,
        "workflow_run_id": info.workflow_run_id,
        "activity_id": info.activity_id,
        "attempt": info.attempt,
        "start_ns": result.start_ns,
        "end_ns": result.end_ns,
        "duration_ms": (result.end_ns - result.start_ns) / 1e6,
        "gateway_timing": result.gateway_timing,
    }
    logger.info("instance created %s", json.dumps(fields, sort_keys=True, default=str))


class GatewayActivities:
    """Gateway activities sharing one `ComputeClient` (or None when no gateway is configured)."""

    def __init__(
        self,
        gateway: ComputeClient | None,
        *,
        api_url: str,
        issue_token: TokenIssuer,
    ) -> None:
        self._gateway = gateway
        self._api_url = api_url.rstrip("/")
        self._issue_token = issue_token

    @property
    def gateway(self) -> ComputeClient:
        if self._gateway is None:
            raise ApplicationError(
                "no compute gateway is configured; set COMPUTE_GATEWAY_URL",
                type=GATEWAY_NOT_CONFIGURED,
                non_retryable=True,
            )
        return self._gateway

    @activity.defn(name="provision_instance")
    async def provision_instance(self, input: ProvisionInput) -> ProvisionResult:
        """Create the run's instance with the runner's environment and workload token."""
        request = InstanceCreateRequest(
            name=input.runner_id,
            image=strip_image_digest(input.image),
            env={
                "VMFLOW_RUN_ID": input.run_id,
                "VMFLOW_RUNNER_ID": input.runner_id,
                "VMFLOW_DEPLOYMENT_ID": input.deployment_id,
                "VMFLOW_WORKLOAD_URL": self._api_url,
                "VMFLOW_WORKLOAD_TOKEN": self._issue_token(
                    input.run_id, input.deployment_id, input.runner_id
                ),
            },
            cpu=input.cpu,
            memory_gb=input.memory_gb,
            metadata={METADATA_RUN_ID: input.run_id, METADATA_RUNNER_ID: input.runner_id},
        )
        start_ns = time.time_ns()
        try:
            response = await self.gateway.instances.create(request)
        except ComputeError as error:
            raise to_application_error(error) from error
        end_ns = time.time_ns()

        result = ProvisionResult(
            instance_id=response.id,
            runner_id=input.runner_id,
            start_ns=start_ns,
            end_ns=end_ns,
            gateway_timing=response.timing,
        )
        _log_instance_created(
            result,
            run_id=input.run_id,
            deployment_id=input.deployment_id,
            image=request.image,
            restored_from=None,
        )
        return result

    @activity.defn(name="request_snapshot")
    async def request_snapshot(self, input: SnapshotRequestInput) -> SnapshotRequestResult:
        """Ask the gateway to snapshot an instance; the result arrives through the callback."""
        request = SnapshotRequest(
            callback=CallbackTarget(
                url=f"{self._api_url}{SNAPSHOT_CALLBACK_PATH}",
                metadata={
                    METADATA_RUN_ID: input.run_id,
                    METADATA_RUNNER_ID: input.runner_id,
                    METADATA_SNAPSHOT_REQUEST_ID: input.request_id,
                },
            )
        )
        requested_at_ns = time.time_ns()
        try:
            accepted = await self.gateway.instances.snapshot(input.instance_id, request)
        except ComputeError as error:
            logger.warning(
                "snapshot request for instance %s of run %s failed: %s",
                input.instance_id,
                input.run_id,
                error,
            )
            raise to_application_error(error) from error
        return SnapshotRequestResult(
            requested_at_ns=requested_at_ns,
            accepted_at_ns=time.time_ns(),
            snapshot_id=accepted.snapshot_id if accepted is not None else None,
        )

    @activity.defn(name="get_instance_state")
    async def get_instance_state(self, input: InstanceStateInput) -> InstanceStateResult:
        """Read an instance's state, exit code and latest snapshot.

        The workflow calls it to reconcile a lost snapshot callback and to check
        that a running task's instance is still alive.
        """
        try:
            instance = await self.gateway.instances.get(input.instance_id)
        except ComputeError as error:
            if _is_not_found(error):
                return InstanceStateResult(state=None)
            raise to_application_error(error) from error

        # Without the id from the 202 response, a `snapshot_id` (or `last_snapshot_id`)
        # field that a gateway adds to the instance body names the snapshot.
        extra = instance.model_extra or {}
        snapshot_id = input.snapshot_id or extra.get("snapshot_id") or extra.get("last_snapshot_id")
        snapshot_state = None
        if snapshot_id:
            try:
                snapshot = await self.gateway.snapshots.get(str(snapshot_id))
                snapshot_state = snapshot.state.value
            except ComputeError as error:
                if not _is_not_found(error):
                    raise to_application_error(error) from error
                snapshot_id = None
        log_tail = None
        if input.log_tail_bytes and instance.state == InstanceState.EXITED:
            log_tail = await self._read_log_tail(input.instance_id, input.log_tail_bytes)
        return InstanceStateResult(
            state=instance.state.value,
            snapshot_id=str(snapshot_id) if snapshot_id else None,
            snapshot_state=snapshot_state,
            exit_code=instance.exit_code,
            log_tail=log_tail,
        )

    async def _read_log_tail(self, instance_id: str, tail_bytes: int) -> str | None:
        """Return the last `tail_bytes` of an instance's output, or None when it cannot be read."""
        path = f"/api/instances/{instance_id}/logs?tail_bytes={tail_bytes}"
        try:
            response = await self.gateway.request("GET", path)
        except ComputeError as error:
            logger.warning("reading the output of instance %s failed: %s", instance_id, error)
            return None
        return response.text

    @activity.defn(name="restore_snapshot")
    async def restore_snapshot(self, input: RestoreInput) -> RestoreResult:
        """Restore a snapshot as a new instance with a new runner id and workload token.

        The metadata also carries the current API URL, so a restored runner
        reaches the API even if it moved since the snapshot was taken.
        """
        request = SnapshotRestoreRequest(
            name=input.runner_id,
            metadata={
                METADATA_RUN_ID: input.run_id,
                "VMFLOW_RUNNER_ID": input.runner_id,
                "VMFLOW_WORKLOAD_URL": self._api_url,
                "VMFLOW_WORKLOAD_TOKEN": self._issue_token(
                    input.run_id, input.deployment_id, input.runner_id
                ),
            },
            cpu=input.cpu,
            memory_gb=input.memory_gb,
        )
        start_ns = time.time_ns()
        try:
            response = await self.gateway.snapshots.restore(input.snapshot_id, request)
        except ComputeError as error:
            raise to_application_error(error) from error
        end_ns = time.time_ns()
        if response is None:
            raise ApplicationError(
                f"restore of snapshot {input.snapshot_id} returned no instance id; "
                "the gateway must answer a restore with {id}",
                type="ComputeResponseError",
                non_retryable=True,
            )
        result = RestoreResult(
            instance_id=response.id,
            runner_id=input.runner_id,
            start_ns=start_ns,
            end_ns=end_ns,
            gateway_timing=response.timing,
        )
        _log_instance_created(
            result,
            run_id=input.run_id,
            deployment_id=input.deployment_id,
            image=None,
            restored_from=input.snapshot_id,
        )
        return result

    @activity.defn(name="delete_instance")
    async def delete_instance(self, input: DeleteInstanceInput) -> DeleteResult:
        """Delete an instance; one the gateway no longer has counts as deleted."""
        return await _delete(self.gateway.instances.delete(input.instance_id))

    @activity.defn(name="delete_snapshot")
    async def delete_snapshot(self, input: DeleteSnapshotInput) -> DeleteResult:
        """Delete a snapshot; one the gateway no longer has counts as deleted."""
        return await _delete(self.gateway.snapshots.delete(input.snapshot_id))

    @activity.defn(name="create_template")
    async def create_template(self, input: TemplateCreateInput) -> TemplateCreateResult:
        """Start a background template build; the gateway reports through the callback."""
        image = strip_image_digest(input.image)
        request = TemplateCreateRequest(
            image=image,
            cpu=input.cpu,
            memory_gb=input.memory_gb,
            background=True,
            callback=CallbackTarget(
                url=f"{self._api_url}{TEMPLATE_CALLBACK_PATH}",
                metadata={METADATA_DEPLOYMENT_ID: input.deployment_id},
            ),
        )
        requested_at_ns = time.time_ns()
        try:
            response = await self.gateway.templates.create(request)
        except ComputeError as error:
            raise to_application_error(error) from error
        if response is None:
            return TemplateCreateResult(image=image, requested_at_ns=requested_at_ns)
        return TemplateCreateResult(
            image=image,
            requested_at_ns=requested_at_ns,
            template_id=response.template_id,
            details=response.model_dump(exclude_none=True),
        )
