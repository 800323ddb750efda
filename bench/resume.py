"""Resume latency: from a token's completion to the task running again, on real sandboxes.

Every part is real: the stack `vmflow dev` starts (Temporal dev server,
SQLite database, gateway with the sandbox driver and CRIU, supervisor API,
worker) on free 127.0.0.1 ports in a temporary data directory, and the
runner inside each sandbox. The task waits for a token and returns the
wall-clock time right after the wait returned. The latency is that time
minus the time the benchmark sent the token's completion to the API.

Two cases: snapshotted (the token is completed once the run is SUSPENDED,
so the snapshot is restored) and in place (completed right after the
suspend request, well inside the snapshot delay, so no snapshot is taken).
The floor is a plain `criu restore` of a comparable process image, measured
in the same invocation (`bench.criu_floor`).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.converter import DataConverter

from bench import criu_floor
from bench.report import Table, emit, format_mib, format_ms, format_ratio, median_ms
from bench.sandbox import MICROVM_LINE, check_sandbox_machine
from vmflow.cli.client import ApiClient
from vmflow.cli.common import poll_until
from vmflow.cli.deploy import deploy_image, wait_for_deployment
from vmflow.cli.runs import FINAL_STATUSES
from vmflow.cli.stack import LocalStack, StackPorts
from vmflow.gateway.drivers.cgroups import CgroupSet
from vmflow.gateway.images import ImageStore
from vmflow.gateway.settings import load_gateway_settings
from vmflow.storage.models import WorkloadType
from workflows import contract

IMAGE_DIR = Path(__file__).resolve().parent / "images" / "token_wait"
IMAGE = "bench-token-wait:bench"
TASK_ID = "bench-token-wait"
STEP_TIMEOUT_S = 180.0
POLL_INTERVAL_S = 0.02


@dataclass
class ResumeResult:
    snapshot_delay_ms: int
    repeats: int
    snapshotted_s: list[float] = field(default_factory=list)
    in_place_s: list[float] = field(default_factory=list)
    restore_call_s: list[float] = field(default_factory=list)
    driver_restore_s: list[float] = field(default_factory=list)
    snapshot_bytes: list[int] = field(default_factory=list)
    floor: criu_floor.CriuFloorResult | None = None


def _final_run(client: ApiClient, run_id: str) -> dict[str, Any]:
    run = poll_until(
        lambda: client.get_run(run_id),
        lambda run: run["status"] in FINAL_STATUSES,
        timeout_s=STEP_TIMEOUT_S,
        interval_s=POLL_INTERVAL_S,
        what=f"run {run_id} finishing",
    )
    if run["status"] != "COMPLETED":
        raise RuntimeError(f"run {run_id} ended {run['status']}: {run.get('error')}")
    return run


@dataclass
class ResumeSample:
    run_id: str
    latency_s: float
    # Size of the run's snapshot as the gateway reports it; None when there was none.
    snapshot_bytes: int | None = None


def _snapshot_bytes(gateway: httpx.Client, run: dict[str, Any]) -> int | None:
    """Return the size of the run's newest snapshot, read from the gateway while it exists."""
    snapshot_id = run["checkpoints"][-1]["location"]
    response = gateway.get(f"/api/snapshots/{snapshot_id}")
    response.raise_for_status()
    size: int | None = response.json().get("size_bytes")
    return size


def _resume_once(
    client: ApiClient, gateway: httpx.Client, deployment_id: str, *, snapshotted: bool
) -> ResumeSample:
    """Trigger a run and complete its token at the chosen point; return the latency."""
    run_id = client.trigger(TASK_ID, {"deployment_id": deployment_id, "payload": {}})["run_id"]
    expected_status = "SUSPENDED" if snapshotted else "SUSPENDING"
    run = poll_until(
        lambda: client.get_run(run_id),
        lambda run: run["status"] == expected_status or run["status"] in FINAL_STATUSES,
        timeout_s=STEP_TIMEOUT_S,
        interval_s=POLL_INTERVAL_S,
        what=f"run {run_id} reaching {expected_status}",
    )
    if run["status"] != expected_status:
        raise RuntimeError(f"run {run_id} ended {run['status']} before it was {expected_status}")
    token = next(
        waitpoint
        for waitpoint in run["waitpoints"]
        if waitpoint["kind"] == "TOKEN" and waitpoint["status"] == "PENDING"
    )
    # The run deletes its snapshot when it ends, so the size is read before the token.
    snapshot_bytes = _snapshot_bytes(gateway, run) if snapshotted else None

    sent_ns = time.time_ns()
    client.complete_token(token["id"], {"sent_at_ns": sent_ns})
    run = _final_run(client, run_id)

    output = run["output"]
    restored = output["finished_as_runner"] != output["started_as_runner"]
    if restored != snapshotted or bool(run["checkpoints"]) != snapshotted:
        raise RuntimeError(
            f"run {run_id} was expected {'to' if snapshotted else 'not to'} be snapshotted and "
            f"restored; it has {len(run['checkpoints'])} checkpoints and ran as "
            f"{output['started_as_runner']} then {output['finished_as_runner']}"
        )
    return ResumeSample(run_id, (output["resumed_at_ns"] - sent_ns) / 1e9, snapshot_bytes)


async def _restore_timings(address: str, run_ids: list[str]) -> list[dict[str, Any]]:
    """Return the result of each run's restore_snapshot activity, read from its history."""
    client = await Client.connect(address)
    converter = DataConverter.default.payload_converter
    results = []
    for run_id in run_ids:
        handle = client.get_workflow_handle(contract.run_workflow_id(run_id))
        scheduled: dict[int, str] = {}
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                attributes = event.activity_task_scheduled_event_attributes
                scheduled[event.event_id] = attributes.activity_type.name
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                completed = event.activity_task_completed_event_attributes
                if scheduled.get(completed.scheduled_event_id) == "restore_snapshot":
                    results.append(converter.from_payloads(completed.result.payloads)[0])
    return results


def measure(repeats: int, warmup: int, snapshot_delay_ms: int) -> ResumeResult:
    check_sandbox_machine()
    result = ResumeResult(snapshot_delay_ms, repeats)
    result.floor = criu_floor.measure(repeats)

    previous_data_dir = os.environ.get("VMFLOW_DATA_DIR")
    with tempfile.TemporaryDirectory(prefix="vmflow-bench-stack-") as directory:
        data_dir = Path(directory) / "data"
        # The stack's gateway reads images from the store of this data directory.
        os.environ["VMFLOW_DATA_DIR"] = str(data_dir)
        try:
            ImageStore(load_gateway_settings().image_dir).build(IMAGE_DIR, IMAGE)
            cgroup_parent = f"vmflow-bench-{uuid.uuid4().hex[:8]}"
            stack = LocalStack(
                data_dir,
                StackPorts(temporal=0, temporal_ui=0, api=0, gateway=0),
                environment={
                    "COMPUTE_SNAPSHOT_DELAY_MS": str(snapshot_delay_ms),
                    "VMFLOW_GATEWAY_CGROUP_PARENT": cgroup_parent,
                },
            )
            stack.start()
            try:
                snapshotted_runs = _run_samples(stack, result, repeats, warmup)
                timings = asyncio.run(_restore_timings(stack.temporal_address, snapshotted_runs))
            finally:
                stack.stop()
                # The stopped gateway may leave its empty cgroup parent behind.
                CgroupSet.remove_parent(cgroup_parent)
        finally:
            if previous_data_dir is None:
                os.environ.pop("VMFLOW_DATA_DIR", None)
            else:
                os.environ["VMFLOW_DATA_DIR"] = previous_data_dir

    for timing in timings:
        result.restore_call_s.append((timing["end_ns"] - timing["start_ns"]) / 1e9)
        driver_ms = (timing.get("gateway_timing") or {}).get("restore_ms")
        if isinstance(driver_ms, int | float):
            result.driver_restore_s.append(driver_ms / 1000)
    return result


def _run_samples(stack: LocalStack, result: ResumeResult, repeats: int, warmup: int) -> list[str]:
    """Deploy the benchmark image and collect both cases; return the measured snapshotted runs."""
    assert stack.secrets is not None
    measured: list[str] = []
    gateway_auth = {"Authorization": f"Bearer {stack.secrets.gateway_token}"}
    with (
        ApiClient(stack.api_url, stack.secrets.api_key, timeout_s=60) as client,
        httpx.Client(base_url=stack.gateway_url, headers=gateway_auth, timeout=60) as gateway,
    ):
        deployment = deploy_image(
            client,
            IMAGE,
            project="bench",
            version=None,
            tasks=None,
            workload_type=WorkloadType.MICROVM,
        )
        deployment = wait_for_deployment(client, deployment["id"], timeout_s=STEP_TIMEOUT_S)
        if deployment["status"] != "DEPLOYED":
            raise RuntimeError(
                f"deployment {deployment['id']} failed: {deployment['error_message']}"
            )
        # The cases alternate, so a slow period of the shared machine affects both.
        for attempt in range(warmup + repeats):
            snapshotted = _resume_once(client, gateway, deployment["id"], snapshotted=True)
            in_place = _resume_once(client, gateway, deployment["id"], snapshotted=False)
            if attempt >= warmup:
                measured.append(snapshotted.run_id)
                result.snapshotted_s.append(snapshotted.latency_s)
                result.in_place_s.append(in_place.latency_s)
                if snapshotted.snapshot_bytes is not None:
                    result.snapshot_bytes.append(snapshotted.snapshot_bytes)
    return measured


def report(result: ResumeResult) -> None:
    emit(
        "real: Temporal dev server, SQLite database, gateway with the sandbox driver and "
        "CRIU, supervisor API, worker, and the runner in each sandbox (the stack of vmflow dev)"
    )
    emit(
        f"snapshot delay {result.snapshot_delay_ms} ms, {result.repeats} runs per case; "
        "latency is token completion sent to the API -> the task's code running again"
    )
    assert result.floor is not None
    floor = median_ms(result.floor.restores_s)
    snapshotted = median_ms(result.snapshotted_s)
    table = Table("sandbox driver", "median", "min", "max", "ratio to floor")

    def row(label: str, samples: list[float]) -> None:
        if not samples:
            table.add(label, "n/a", "n/a", "n/a", "n/a")
            return
        value = median_ms(samples)
        table.add(
            label,
            format_ms(value),
            format_ms(min(samples) * 1000),
            format_ms(max(samples) * 1000),
            format_ratio(value, floor),
        )

    row("resume, snapshotted (token -> task running)", result.snapshotted_s)
    row("resume, in place (no snapshot)", result.in_place_s)
    row("  of which: gateway restore call (worker side)", result.restore_call_s)
    row("  of which: sandbox restore in the driver", result.driver_restore_s)
    row("floor: plain criu restore, comparable process", result.floor.restores_s)
    emit(table.render())
    emit(
        f"floor image: {format_mib(result.floor.image_bytes)} "
        f"(a Python process that imported the runner agent); {result.floor.criu}"
    )
    if result.snapshot_bytes:
        emit(
            "sandbox snapshot of the runner, median: "
            f"{format_mib(statistics.median(result.snapshot_bytes))}"
        )
    emit(f"snapshotted / in place: {format_ratio(snapshotted, median_ms(result.in_place_s))}")
    emit(MICROVM_LINE)
    emit(
        "NOTE: the runner polls a suspended waitpoint every 200 ms, so up to 200 ms of each "
        "latency is the poll interval."
    )
