"""The example images in real sandboxes of the gateway, against a real workload API.

The test drives the gateway as the run workflow would: once the runner requests
a suspend it snapshots the instance, deletes it, completes the token, and
restores the snapshot under a new name and runner id. The report the task
returns proves that its in-memory aggregates survived.
"""

from __future__ import annotations

import asyncio
import csv
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from tests.machine import CRIU, IS_ROOT
from tests.runner.conftest import EXAMPLES_DIR, WorkloadServer
from vmflow.api.waitpoints import complete_token
from vmflow.compute.client import ComputeClient
from vmflow.compute.errors import ComputeHTTPError
from vmflow.compute.models import (
    CallbackTarget,
    InstanceCreateRequest,
    SnapshotRequest,
    SnapshotRestoreRequest,
    TemplateCreateRequest,
)
from vmflow.gateway.images import ImageStore
from vmflow.gateway.server import GatewayServer
from vmflow.gateway.settings import GatewaySettings
from vmflow.storage.db import session_scope
from vmflow.storage.models import TaskRun, TaskRunStatus

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.slow]

ResultT = TypeVar("ResultT")

# Raised from the defaults, because a cold sandbox with Python takes seconds on a busy host.
RUN_TIMEOUT_S = 120


def _skip_without_root_and_criu() -> None:
    if not IS_ROOT:
        pytest.skip("sandboxes need root (namespaces, cgroups, CRIU)")
    if not CRIU.works:
        pytest.skip(f"CRIU 4 does not work here: {CRIU.detail}")


async def wait_until_async(
    probe: Callable[[], ResultT | None], *, timeout_s: float, message: str
) -> ResultT:
    """Like `wait_until`, but yields to the event loop that also runs the gateway."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout_s} s: {message}", pytrace=False)
        await asyncio.sleep(0.1)


@pytest_asyncio.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[GatewayServer, ComputeClient]]:
    _skip_without_root_and_criu()
    token = f"gateway-{uuid.uuid4().hex}"
    settings = GatewaySettings(
        host="127.0.0.1",
        port=0,
        auth_token=token,
        callback_secret=f"callbacks-{uuid.uuid4().hex}",
        state_dir=tmp_path / "gateway",
        image_dir=tmp_path / "images",
        cgroup_parent=f"vmflow-test-{uuid.uuid4().hex[:8]}",
    )
    async with (
        GatewayServer(settings) as server,
        ComputeClient(server.url, auth_token=token, timeout_s=120) as client,
    ):
        yield server, client


def _expected_precipitation(year: int) -> float:
    with (EXAMPLES_DIR / "approval-report" / "data" / "seattle-weather.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row["date"].startswith(f"{year}/")]
    return round(sum(float(row["precipitation"]) for row in rows), 1)


def _instance_env(server: WorkloadServer, run: TaskRun, runner_id: str) -> dict[str, str]:
    return {
        "VMFLOW_RUN_ID": run.id,
        "VMFLOW_RUNNER_ID": runner_id,
        "VMFLOW_DEPLOYMENT_ID": run.deployment_id,
        "VMFLOW_WORKLOAD_URL": server.url,
        "VMFLOW_WORKLOAD_TOKEN": server.token(run.id, run.deployment_id),
    }


async def _instance_output(client: ComputeClient, instance_id: str) -> str:
    try:
        response = await client.request("GET", f"/api/instances/{instance_id}/logs")
    except ComputeHTTPError as error:
        return f"<no output: {error}>"
    return response.text


@pytest.mark.parametrize("task_id", ["approval-report", "approval-report-async"])
async def test_sandbox_report_survives_snapshot_restore(
    task_id: str,
    workload_server: WorkloadServer,
    gateway: tuple[GatewayServer, ComputeClient],
) -> None:
    gateway_server, client = gateway
    image = f"approval-report:{uuid.uuid4().hex[:8]}"
    ImageStore(gateway_server.settings.image_dir).build(EXAMPLES_DIR / "approval-report", image)
    run = workload_server.create_run(task_id, {"year": 2015, "approval_timeout_s": 3600})
    first_runner, second_runner = f"{run.id}-r1", f"{run.id}-r2"

    # Start the run and wait for its suspend request at the approval token.
    created = await client.instances.create(
        InstanceCreateRequest(
            name=f"run-{run.id}",
            image=image,
            env=_instance_env(workload_server, run, first_runner),
            cpu=1,
            memory_gb=0.5,
        )
    )
    await wait_until_async(
        lambda: workload_server.events.for_run(run.id, "suspend_requested"),
        timeout_s=RUN_TIMEOUT_S,
        message=f"run {run.id} never asked to suspend (see instance {created.id}'s output)",
    )
    logged = "\n".join(workload_server.log_messages(run.id))
    match = re.search(r"aggregated 12 months of 2015 as ([0-9a-f]{32})", logged)
    assert match, f"no aggregation line in the run log:\n{logged}"
    aggregation_id = match.group(1)

    # Snapshot, then delete the instance: the run now uses no compute.
    await client.instances.snapshot(
        created.id,
        SnapshotRequest(
            callback=CallbackTarget(url=workload_server.callback_url, metadata={"run_id": run.id})
        ),
    )
    callback = await wait_until_async(
        lambda: next(
            (c for c in workload_server.callbacks if c.get("metadata", {}).get("run_id") == run.id),
            None,
        ),
        timeout_s=RUN_TIMEOUT_S,
        message=f"no snapshot callback for instance {created.id}",
    )
    assert callback["status"] == "completed", callback
    snapshot_id = callback["snapshot_id"]
    await client.instances.delete(created.id)

    # Approve while no instance exists, then restore as a new runner.
    (token,) = workload_server.waitpoints(run.id)
    with session_scope(workload_server.sessions) as session:
        complete_token(session, token.id, {"approver": "Grace", "note": "numbers match NOAA"})
    restored = await client.snapshots.restore(
        snapshot_id,
        SnapshotRestoreRequest(
            name=f"run-{run.id}-2",
            metadata={"VMFLOW_RUNNER_ID": second_runner},
            cpu=1,
            memory_gb=0.5,
        ),
    )
    assert restored is not None

    finished = await wait_until_async(
        lambda: (stored := workload_server.get_run(run.id)).status.is_final and stored,
        timeout_s=RUN_TIMEOUT_S,
        message=f"run {run.id} did not finish after the restore",
    )
    output = await _instance_output(client, restored.id)
    assert finished.status is TaskRunStatus.COMPLETED, f"{finished.error}\n{output}"
    report: dict[str, Any] = finished.output
    assert report["aggregation_id"] == aggregation_id
    assert report["started_as_runner"] == first_runner
    assert report["finished_as_runner"] == second_runner
    assert len(report["months"]) == 12
    assert report["total_precipitation_mm"] == _expected_precipitation(2015)
    assert report["approval"] == {"approver": "Grace", "note": "numbers match NOAA"}
    assert "Approved by Grace: numbers match NOAA" in report["markdown"]
    assert finished.runner_id == second_runner
    resumed = workload_server.events.for_run(run.id, "runner_resumed")
    assert [event.runner_id for event in resumed] == [second_runner]
    assert any(
        "woke inside a restored snapshot" in line for line in workload_server.log_messages(run.id)
    )

    await client.instances.delete(restored.id)
    await client.snapshots.delete(snapshot_id)


async def test_sandbox_failing_task_reports_error(
    workload_server: WorkloadServer, gateway: tuple[GatewayServer, ComputeClient]
) -> None:
    gateway_server, client = gateway
    image = f"failing-task:{uuid.uuid4().hex[:8]}"
    ImageStore(gateway_server.settings.image_dir).build(EXAMPLES_DIR / "failing-task", image)
    run = workload_server.create_run("failing-task")

    created = await client.instances.create(
        InstanceCreateRequest(
            name=f"run-{run.id}",
            image=image,
            env=_instance_env(workload_server, run, f"{run.id}-r1"),
            cpu=1,
            memory_gb=0.5,
        )
    )
    failed = await wait_until_async(
        lambda: (stored := workload_server.get_run(run.id)).status.is_final and stored,
        timeout_s=RUN_TIMEOUT_S,
        message=f"run {run.id} did not finish",
    )

    assert failed.status is TaskRunStatus.FAILED
    assert failed.error["name"] == "tasks.ReportValidationError"
    assert "row 1 has negative precipitation -1.5" in failed.error["message"]
    assert "validate(rows)" in failed.error["traceback"]
    assert "vmflow.task.failing-task: validating 2 rows" in workload_server.log_messages(run.id)
    await client.instances.delete(created.id)


@pytest.mark.parametrize("task_id", ["duration-wait", "duration-wait-async"])
async def test_sandbox_template_instance_runs_duration_wait(
    task_id: str,
    workload_server: WorkloadServer,
    gateway: tuple[GatewayServer, ComputeClient],
) -> None:
    gateway_server, client = gateway
    image = f"duration-wait:{uuid.uuid4().hex[:8]}"
    ImageStore(gateway_server.settings.image_dir).build(EXAMPLES_DIR / "duration-wait", image)

    # The template's process reports ready with no run, is snapshotted there,
    # and each instance restored from it learns its run from the channel.
    template = await client.templates.create(
        TemplateCreateRequest(image=image, cpu=1, memory_gb=0.5)
    )
    assert template is not None
    assert template.status == "completed", template
    run = workload_server.create_run(task_id, {"seconds": 0.5})
    created = await client.instances.create(
        InstanceCreateRequest(
            name=f"run-{run.id}",
            image=image,
            env=_instance_env(workload_server, run, f"{run.id}-r1"),
            cpu=1,
            memory_gb=0.5,
        )
    )

    finished = await wait_until_async(
        lambda: (stored := workload_server.get_run(run.id)).status.is_final and stored,
        timeout_s=RUN_TIMEOUT_S,
        message=f"run {run.id} did not finish",
    )
    output = await _instance_output(client, created.id)
    assert created.timing is not None
    assert created.timing["mode"] == "template"
    assert finished.status is TaskRunStatus.COMPLETED, f"{finished.error}\n{output}"
    assert finished.output["waited_s"] >= 0.5
    assert finished.output["steps"][0] == "before"
    assert finished.output["steps"][-1] == "after"
    assert [event.name for event in workload_server.events.for_run(run.id)] == [
        "runner_started",
        "suspend_requested",
        "runner_resumed",
        "runner_finished",
    ]
    await client.instances.delete(created.id)
