"""An in-process compute gateway that records every call, for unit tests of the workflows.

It has the shape of `ComputeClient` (`instances`, `snapshots`, `templates`)
and delivers snapshot and template callbacks the way the supervisor API
does: as signals on the workflow that the callback metadata names. Modes
select how snapshots end (completed, failed, rejected with 4xx, or with a
lost callback), and a dispatch gate delays snapshot requests to measure how
many are in flight at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from temporalio.client import Client

from vmflow.compute import ComputeHTTPError
from vmflow.compute.models import (
    Instance,
    InstanceCreateRequest,
    InstanceCreateResponse,
    InstanceState,
    Snapshot,
    SnapshotAccepted,
    SnapshotRequest,
    SnapshotRestoreRequest,
    SnapshotRestoreResponse,
    SnapshotState,
    TemplateCreateRequest,
    TemplateCreateResponse,
)
from workflows.contract import (
    METADATA_DEPLOYMENT_ID,
    METADATA_RUN_ID,
    SIGNAL_SNAPSHOT_FINISHED,
    SIGNAL_TEMPLATE_FINISHED,
    SnapshotFinished,
    SnapshotStatus,
    TemplateFinished,
    run_workflow_id,
    template_build_workflow_id,
)

# Seconds a test waits for a gateway call before it fails; a safety net, not a measurement.
CALL_WAIT_TIMEOUT_S = 60.0


@dataclass
class Call:
    operation: str
    target: str | None
    body: dict[str, Any]
    at_ns: int = field(default_factory=time.time_ns)


def _not_found(kind: str, key: str) -> ComputeHTTPError:
    url = f"http://gateway.test/api/{kind}s/{key}"
    return ComputeHTTPError(f"GET {url} returned 404", url=url, status=404, body="not found")


class RecordingGateway:
    """A gateway double; `calls` lists every call in order."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.calls: list[Call] = []
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)
        self.instance_states: dict[str, InstanceState] = {}
        self.instance_exit_codes: dict[str, int] = {}
        # Output of each instance, as `GET /api/instances/{id}/logs` returns it.
        self.instance_logs: dict[str, str] = {}
        self.instance_snapshots: dict[str, str] = {}
        self.snapshot_states: dict[str, SnapshotState] = {}

        # "completed", "failed", "rejected" (409 on the request), "lost" (a snapshot
        # but no callback) or "vanished" (neither).
        self.snapshot_mode = "completed"
        # When set, instance creation fails with this HTTP status.
        self.create_error_status: int | None = None
        # "completed", "failed" or "lost" (no callback).
        self.template_mode = "completed"
        # When set, callbacks wait in `held_callbacks` until `release_callbacks()`.
        self.hold_callbacks = False
        self.held_callbacks: list[Callable[[], Any]] = []
        # When set, a snapshot request waits until this returns True.
        self.snapshot_gate: Callable[[RecordingGateway], bool] | None = None
        self.snapshots_in_flight = 0
        self.max_snapshots_in_flight = 0
        self.snapshot_requests_started = 0
        # Where the gateway names a new snapshot before its callback: in the 202
        # body of the request (as the reference gateway does) or in the instance body.
        self.snapshot_id_in = "accepted"

        self.instances = _Instances(self)
        self.snapshots = _Snapshots(self)
        self.templates = _Templates(self)

    def exit_instance(self, instance_id: str, exit_code: int, output: str = "") -> None:
        """Make an instance exited, as when its process dies."""
        self.instance_states[instance_id] = InstanceState.EXITED
        self.instance_exit_codes[instance_id] = exit_code
        self.instance_logs[instance_id] = output

    async def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """Serve `ComputeClient.request` for `GET /api/instances/{id}/logs` only."""
        route = httpx.URL(path)
        parts = route.path.strip("/").split("/")
        if method != "GET" or len(parts) != 4 or parts[:2] != ["api", "instances"]:
            raise AssertionError(f"the gateway double does not serve {method} {path}")
        if parts[3] != "logs":
            raise AssertionError(f"the gateway double does not serve {method} {path}")
        instance_id = parts[2]
        await self.record("instances.logs", instance_id)
        if instance_id not in self.instance_states:
            raise _not_found("instance", instance_id)
        output = self.instance_logs.get(instance_id, "")
        tail_bytes = route.params.get("tail_bytes")
        if tail_bytes is not None:
            output = output.encode()[-int(tail_bytes) :].decode(errors="replace")
        return httpx.Response(200, text=output)

    def calls_of(self, operation: str) -> list[Call]:
        return [call for call in self.calls if call.operation == operation]

    async def record(self, operation: str, target: str | None, body: Any = None) -> None:
        data = body.model_dump(mode="json") if body is not None else {}
        async with self._changed:
            self.calls.append(Call(operation, target, data))
            self._changed.notify_all()

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, operation: str, count: int = 1) -> list[Call]:
        """Wait until `operation` was called `count` times; return those calls."""

        def enough() -> bool:
            return len(self.calls_of(operation)) >= count

        try:
            async with asyncio.timeout(CALL_WAIT_TIMEOUT_S):
                async with self._changed:
                    await self._changed.wait_for(enough)
        except TimeoutError:
            seen = [call.operation for call in self.calls]
            raise AssertionError(
                f"expected {count} {operation} call(s) within {CALL_WAIT_TIMEOUT_S} s; "
                f"calls so far: {seen}"
            ) from None
        return self.calls_of(operation)[:count]

    async def wait_until(self, predicate: Callable[[], bool], description: str) -> None:
        try:
            async with asyncio.timeout(CALL_WAIT_TIMEOUT_S):
                async with self._changed:
                    await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(f"timed out waiting until {description}") from None

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def deliver(self, callback: Callable[[], Any]) -> None:
        if self.hold_callbacks:
            self.held_callbacks.append(callback)
            await self.notify()
            return
        await callback()

    async def release_callbacks(self) -> None:
        held, self.held_callbacks = self.held_callbacks, []
        for callback in held:
            await callback()

    async def signal_run(self, run_id: str, message: SnapshotFinished) -> None:
        handle = self._client.get_workflow_handle(run_workflow_id(run_id))
        await handle.signal(SIGNAL_SNAPSHOT_FINISHED, message)

    async def signal_template(self, deployment_id: str, message: TemplateFinished) -> None:
        handle = self._client.get_workflow_handle(template_build_workflow_id(deployment_id))
        await handle.signal(SIGNAL_TEMPLATE_FINISHED, message)


class _Instances:
    def __init__(self, gateway: RecordingGateway) -> None:
        self._gateway = gateway

    async def create(self, request: InstanceCreateRequest) -> InstanceCreateResponse:
        status = self._gateway.create_error_status
        if status is not None:
            await self._gateway.record("instances.create", None, request)
            url = "http://gateway.test/api/instances"
            raise ComputeHTTPError(
                f"POST {url} returned {status}", url=url, status=status, body="rejected"
            )
        instance_id = self._gateway.new_id("inst")
        self._gateway.instance_states[instance_id] = InstanceState.RUNNING
        await self._gateway.record("instances.create", instance_id, request)
        return InstanceCreateResponse(id=instance_id, _timing={"boot_ms": 12.5})

    async def get(self, instance_id: str) -> Instance:
        await self._gateway.record("instances.get", instance_id)
        state = self._gateway.instance_states.get(instance_id)
        if state is None:
            raise _not_found("instance", instance_id)
        extra: dict[str, Any] = {}
        named = self._gateway.snapshot_id_in == "instance"
        if named and instance_id in self._gateway.instance_snapshots:
            extra["snapshot_id"] = self._gateway.instance_snapshots[instance_id]
        exit_code = self._gateway.instance_exit_codes.get(instance_id)
        return Instance(
            id=instance_id,
            name=instance_id,
            image="img",
            state=state,
            exit_code=exit_code,
            **extra,
        )

    async def delete(self, instance_id: str) -> None:
        await self._gateway.record("instances.delete", instance_id)
        state = self._gateway.instance_states.get(instance_id)
        if state is None:
            raise _not_found("instance", instance_id)
        if state == InstanceState.SNAPSHOTTING:
            url = f"http://gateway.test/api/instances/{instance_id}"
            raise ComputeHTTPError(
                f"DELETE {url} returned 409: it is snapshotting",
                url=url,
                status=409,
                body="it is snapshotting",
            )
        self._gateway.instance_states[instance_id] = InstanceState.DELETED

    async def snapshot(self, instance_id: str, request: SnapshotRequest) -> SnapshotAccepted | None:
        gateway = self._gateway
        gateway.snapshots_in_flight += 1
        gateway.snapshot_requests_started += 1
        gateway.max_snapshots_in_flight = max(
            gateway.max_snapshots_in_flight, gateway.snapshots_in_flight
        )
        try:
            await gateway.record("instances.snapshot", instance_id, request)
            if gateway.snapshot_gate is not None:
                gate = gateway.snapshot_gate
                await gateway.wait_until(lambda: gate(gateway), "the snapshot gate opened")
        finally:
            gateway.snapshots_in_flight -= 1
            await gateway.notify()

        mode = gateway.snapshot_mode
        if mode == "rejected":
            url = f"http://gateway.test/api/instances/{instance_id}/snapshot"
            raise ComputeHTTPError(
                f"POST {url} returned 409: instance is not running",
                url=url,
                status=409,
                body="instance is not running",
            )
        if mode == "vanished":
            # The request is accepted but nothing happens: no snapshot, no callback.
            return None
        metadata = dict(request.callback.metadata)
        run_id = metadata[METADATA_RUN_ID]
        if mode == "failed":
            message = SnapshotFinished(
                status=SnapshotStatus.FAILED,
                instance_id=instance_id,
                error="criu dump failed: test double",
                metadata=metadata,
            )
        else:
            snapshot_id = gateway.new_id("snap")
            gateway.instance_snapshots[instance_id] = snapshot_id
            # A held callback means a snapshot still in progress until it is delivered.
            if gateway.hold_callbacks and mode != "lost":
                gateway.snapshot_states[snapshot_id] = SnapshotState.PENDING
                gateway.instance_states[instance_id] = InstanceState.SNAPSHOTTING
            else:
                gateway.snapshot_states[snapshot_id] = SnapshotState.COMPLETED
                gateway.instance_states[instance_id] = InstanceState.STOPPED
            message = SnapshotFinished(
                status=SnapshotStatus.COMPLETED,
                instance_id=instance_id,
                snapshot_id=snapshot_id,
                metadata=metadata,
                duration_ms=80.0,
            )
        accepted = None
        if gateway.snapshot_id_in == "accepted" and message.snapshot_id is not None:
            accepted = SnapshotAccepted(
                snapshot_id=message.snapshot_id, instance_id=instance_id, status="pending"
            )
        if mode == "lost":
            return accepted

        async def callback() -> None:
            if gateway.snapshot_states.get(message.snapshot_id or "") == SnapshotState.PENDING:
                gateway.snapshot_states[message.snapshot_id or ""] = SnapshotState.COMPLETED
            if gateway.instance_states.get(instance_id) == InstanceState.SNAPSHOTTING:
                gateway.instance_states[instance_id] = InstanceState.STOPPED
            message.received_at_ns = time.time_ns()
            await gateway.signal_run(run_id, message)

        # The real gateway responds 202 first and calls back later.
        asyncio.get_running_loop().call_soon(
            lambda: asyncio.ensure_future(gateway.deliver(callback))
        )
        return accepted


class _Snapshots:
    def __init__(self, gateway: RecordingGateway) -> None:
        self._gateway = gateway

    async def restore(
        self, snapshot_id: str, request: SnapshotRestoreRequest
    ) -> SnapshotRestoreResponse:
        await self._gateway.record("snapshots.restore", snapshot_id, request)
        if self._gateway.snapshot_states.get(snapshot_id) != SnapshotState.COMPLETED:
            raise _not_found("snapshot", snapshot_id)
        instance_id = self._gateway.new_id("inst")
        self._gateway.instance_states[instance_id] = InstanceState.RUNNING
        return SnapshotRestoreResponse(id=instance_id, _timing={"restore_ms": 7.0})

    async def get(self, snapshot_id: str) -> Snapshot:
        await self._gateway.record("snapshots.get", snapshot_id)
        state = self._gateway.snapshot_states.get(snapshot_id)
        if state is None:
            raise _not_found("snapshot", snapshot_id)
        return Snapshot(id=snapshot_id, instance_id="unknown", state=state)

    async def delete(self, snapshot_id: str) -> None:
        await self._gateway.record("snapshots.delete", snapshot_id)
        state = self._gateway.snapshot_states.get(snapshot_id)
        if state is None:
            raise _not_found("snapshot", snapshot_id)
        if state == SnapshotState.PENDING:
            url = f"http://gateway.test/api/snapshots/{snapshot_id}"
            raise ComputeHTTPError(
                f"DELETE {url} returned 409: it is pending",
                url=url,
                status=409,
                body="it is pending",
            )
        self._gateway.snapshot_states[snapshot_id] = SnapshotState.DELETED


class _Templates:
    def __init__(self, gateway: RecordingGateway) -> None:
        self._gateway = gateway

    async def create(self, request: TemplateCreateRequest) -> TemplateCreateResponse | None:
        gateway = self._gateway
        await gateway.record("templates.create", request.image, request)
        assert request.callback is not None
        deployment_id = request.callback.metadata[METADATA_DEPLOYMENT_ID]
        if gateway.template_mode == "completed":
            message = TemplateFinished(
                status=SnapshotStatus.COMPLETED,
                image=request.image,
                template_id=gateway.new_id("tmpl"),
                metadata=dict(request.callback.metadata),
                duration_ms=1500.0,
            )
        else:
            message = TemplateFinished(
                status=SnapshotStatus.FAILED,
                image=request.image,
                error="runner never became ready: test double",
                metadata=dict(request.callback.metadata),
            )

        if gateway.template_mode == "lost":
            return None

        async def callback() -> None:
            await gateway.signal_template(deployment_id, message)

        asyncio.get_running_loop().call_soon(
            lambda: asyncio.ensure_future(gateway.deliver(callback))
        )
        return None
