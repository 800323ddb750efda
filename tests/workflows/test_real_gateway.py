"""RunExecutionWorkflow against the real sandbox gateway, the real supervisor API and the
Temporal dev server.

The gateway really isolates, snapshots (CRIU) and restores a small program;
its signed callbacks reach the workflow through the API's callback route.
The test plays the runner's part by sending the runner messages itself.
Real time passes here, so delays are short and the test waits for states.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from activities.database import DatabaseActivities
from activities.gateway import GatewayActivities
from activities.spans import SpanActivities
from activities.tokens import workload_token_issuer
from tests.gateway.conftest import CGROUP_PARENT, PROGRAMS
from tests.machine import CRIU, IS_ROOT
from tests.servers import serve_app
from tests.workflows.conftest import new_id, seed_deployment, seed_run
from vmflow.api.app import create_app
from vmflow.compute import ComputeClient, ComputeHTTPError
from vmflow.compute.models import InstanceState, SnapshotState
from vmflow.config import Settings, load_settings
from vmflow.gateway.images import ImageStore
from vmflow.gateway.server import GatewayServer
from vmflow.gateway.settings import GatewaySettings
from vmflow.storage.db import session_scope
from vmflow.storage.models import (
    CheckpointType,
    Deployment,
    DeploymentStatus,
    TaskRunCheckpoint,
    WorkloadType,
)
from vmflow.telemetry import ComputeSpanRecorder, build_tracer_provider
from worker import WORKFLOWS, ActivitySet, build_workers
from workflows.contract import (
    QUERY_RUN_STATE,
    SIGNAL_RUNNER_FINISHED,
    SIGNAL_RUNNER_STARTED,
    SIGNAL_SUSPEND_REQUESTED,
    SIGNAL_WAITPOINT_COMPLETED,
    DeployTemplateInput,
    RunExecutionInput,
    RunExecutionResult,
    RunnerFinished,
    RunnerStarted,
    RunState,
    RunStateView,
    SuspendRequested,
    WaitpointCompleted,
    WaitpointKind,
    deploy_workflow_id,
    run_workflow_id,
    runner_id_for,
)
from workflows.deploy_template import DeployTemplateWorkflow
from workflows.run_execution import RunExecutionWorkflow

pytestmark = [
    pytest.mark.root,
    pytest.mark.criu,
    pytest.mark.slow,
    pytest.mark.skipif(not IS_ROOT, reason="needs root for namespaces, cgroups and bind mounts"),
    pytest.mark.skipif(not CRIU.works, reason=f"needs a working CRIU 4: {CRIU.detail}"),
]

AUTH_TOKEN = "real-gateway-token"
CALLBACK_SECRET = "real-gateway-callback-secret"
# Seconds a test waits for a run to reach a state; a safety net, not a measurement.
STATE_WAIT_S = 120.0


@dataclass
class RealStack:
    env: WorkflowEnvironment
    compute: ComputeClient
    sessions: sessionmaker[Session]
    image: str
    task_queue: str
    api_url: str
    api_settings: Settings
    executor: ThreadPoolExecutor
    recorder: ComputeSpanRecorder
    _workers: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def start_workers(self, *, api_url: str | None = None) -> None:
        """Start workers whose gateway callbacks go to `api_url` (the API by default)."""
        activities = ActivitySet(
            gateway=GatewayActivities(
                self.compute,
                api_url=api_url or self.api_url,
                issue_token=workload_token_issuer(self.api_settings),
            ),
            database=DatabaseActivities(
                self.sessions, gateway_configured=True, shadow_rollout_pct=0.0
            ),
            spans=SpanActivities(self.recorder),
        )
        for worker in build_workers(
            self.env.client,
            activities,
            snapshot_dispatch_limit=2,
            executor=self.executor,
            task_queue=self.task_queue,
            snapshot_task_queue=f"{self.task_queue}-snapshots",
            max_cached_workflows=0,
        ):
            await self._workers.enter_async_context(worker)

    async def stop_workers(self) -> None:
        await self._workers.aclose()
        self._workers = contextlib.AsyncExitStack()

    async def start_run(self, **overrides: Any) -> tuple[str, WorkflowHandle[Any, Any]]:
        seeded = seed_deployment(self.sessions)
        run_id = new_id("run")
        seed_run(self.sessions, seeded.deployment_id, run_id)
        fields: dict[str, Any] = {
            "run_id": run_id,
            "deployment_id": seeded.deployment_id,
            "image": self.image,
            "cpu": 0.5,
            "memory_gb": 0.25,
            "snapshot_delay_ms": 200,
            "snapshot_callback_timeout_s": 60.0,
            "snapshot_task_queue": f"{self.task_queue}-snapshots",
        }
        fields.update(overrides)
        handle = await self.env.client.start_workflow(
            RunExecutionWorkflow.run,
            RunExecutionInput(**fields),
            id=run_workflow_id(run_id),
            task_queue=self.task_queue,
        )
        return run_id, handle


def build_sleeper_image(image_dir: Path, work_dir: Path) -> str:
    project = work_dir / "sleeper-project"
    project.mkdir()
    shutil.copy(PROGRAMS / "channel_client.py", project)
    shutil.copy(Path(__file__).parent / "programs" / "sleeper.py", project)
    (project / "vmflow.toml").write_text(
        '[image]\nname = "sleeper"\ntasks = ["sleeper"]\ncommand = ["python", "sleeper.py"]\n'
    )
    reference = f"sleeper:{uuid.uuid4().hex[:8]}"
    ImageStore(image_dir).build(project, reference)
    return reference


@pytest_asyncio.fixture(loop_scope="session")
async def real_stack(
    temporal_dev_env: WorkflowEnvironment, sessions: sessionmaker[Session], tmp_path: Path
) -> AsyncIterator[RealStack]:
    gateway_settings = GatewaySettings(
        host="127.0.0.1",
        port=0,
        auth_token=AUTH_TOKEN,
        callback_secret=CALLBACK_SECRET,
        state_dir=tmp_path / "state",
        image_dir=tmp_path / "images",
        cgroup_parent=CGROUP_PARENT,
        pids_max=64,
    )
    image = build_sleeper_image(gateway_settings.image_dir, tmp_path)
    task_queue = new_id("tq-real")
    executor = ThreadPoolExecutor(4)
    provider = build_tracer_provider(None)

    async with GatewayServer(gateway_settings) as gateway:
        api_settings: Settings = load_settings(
            VMFLOW_API_KEY="real-gateway-api-key",
            VMFLOW_CALLBACK_SECRET=CALLBACK_SECRET,
            VMFLOW_WORKLOAD_SECRET="real-gateway-workload-secret",
            COMPUTE_GATEWAY_URL=gateway.url,
        )
        app = create_app(
            api_settings,
            temporal_client=temporal_dev_env.client,
            sessions=sessions,
            task_queue=task_queue,
        )
        async with (
            serve_app(app, lifespan="on", start_timeout_s=30) as api_url,
            ComputeClient(gateway.url, auth_token=AUTH_TOKEN, timeout_s=120) as compute,
        ):
            stack = RealStack(
                env=temporal_dev_env,
                compute=compute,
                sessions=sessions,
                image=image,
                task_queue=task_queue,
                api_url=api_url,
                api_settings=api_settings,
                executor=executor,
                recorder=ComputeSpanRecorder(provider),
            )
            try:
                yield stack
            finally:
                await stack.stop_workers()
    executor.shutdown(wait=True)
    provider.shutdown()


async def wait_for_state(
    handle: WorkflowHandle[Any, Any], predicate: Any, description: str
) -> RunStateView:
    """Query the run until `predicate(view)` holds; fail after STATE_WAIT_S."""
    view: RunStateView | None = None
    try:
        async with asyncio.timeout(STATE_WAIT_S):
            while True:
                view = await handle.query(QUERY_RUN_STATE, result_type=RunStateView)
                if predicate(view):
                    return view
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"run never reached {description}; last state {view}") from None


async def finish(handle: WorkflowHandle[Any, Any], runner_id: str) -> RunExecutionResult:
    await handle.signal(SIGNAL_RUNNER_FINISHED, RunnerFinished(runner_id, True, "done"))
    result: RunExecutionResult = await handle.result()
    return result


async def instance_state(compute: ComputeClient, instance_id: str) -> InstanceState | None:
    try:
        return (await compute.instances.get(instance_id)).state
    except ComputeHTTPError as error:
        if error.status == 404:
            return None
        raise


async def suspend(handle: WorkflowHandle[Any, Any], runner_id: str, waitpoint_id: str) -> None:
    await handle.signal(
        SIGNAL_SUSPEND_REQUESTED,
        SuspendRequested(runner_id=runner_id, waitpoint_id=waitpoint_id, kind=WaitpointKind.TOKEN),
    )


async def test_real_gateway_resolution_before_delay(real_stack: RealStack) -> None:
    await real_stack.start_workers()
    run_id, handle = await real_stack.start_run(snapshot_delay_ms=60_000)
    view = await wait_for_state(handle, lambda v: v.state == RunState.EXECUTING, "EXECUTING")
    instance_id = view.instance_id
    assert instance_id is not None
    assert await instance_state(real_stack.compute, instance_id) == InstanceState.RUNNING
    runner = runner_id_for(run_id, 1)
    await handle.signal(SIGNAL_RUNNER_STARTED, RunnerStarted(runner))

    await suspend(handle, runner, "wp-quick")
    await handle.signal(SIGNAL_WAITPOINT_COMPLETED, WaitpointCompleted("wp-quick"))
    result = await finish(handle, runner)

    assert result.state == RunState.COMPLETED
    assert result.snapshot_count == 0
    assert await instance_state(real_stack.compute, instance_id) in (None, InstanceState.DELETED)


async def test_real_gateway_snapshot_and_restore(real_stack: RealStack) -> None:
    await real_stack.start_workers()
    run_id, handle = await real_stack.start_run()
    first = await wait_for_state(handle, lambda v: v.state == RunState.EXECUTING, "EXECUTING")
    runner = runner_id_for(run_id, 1)
    await handle.signal(SIGNAL_RUNNER_STARTED, RunnerStarted(runner))

    await suspend(handle, runner, "wp-long")
    view = await wait_for_state(handle, lambda v: v.state == RunState.SUSPENDED, "SUSPENDED")
    snapshot_id = view.snapshot_id
    assert snapshot_id is not None
    snapshot = await real_stack.compute.snapshots.get(snapshot_id)
    assert snapshot.state == SnapshotState.COMPLETED
    assert first.instance_id is not None
    assert await instance_state(real_stack.compute, first.instance_id) in (
        None,
        InstanceState.DELETED,
    )
    with session_scope(real_stack.sessions) as session:
        checkpoint = session.scalars(
            select(TaskRunCheckpoint).where(TaskRunCheckpoint.run_id == run_id)
        ).one()
        assert checkpoint.type == CheckpointType.COMPUTE
        assert checkpoint.location == snapshot_id

    # A message from a runner that is not the current one changes nothing.
    await handle.signal(SIGNAL_RUNNER_FINISHED, RunnerFinished("not-the-runner", True))
    await handle.signal(SIGNAL_WAITPOINT_COMPLETED, WaitpointCompleted("wp-long", "ok"))
    restored = await wait_for_state(
        handle, lambda v: v.state == RunState.EXECUTING and v.restore_count == 1, "restored"
    )
    assert restored.runner_id == runner_id_for(run_id, 2)
    assert restored.instance_id is not None
    restored_instance = await real_stack.compute.instances.get(restored.instance_id)
    assert restored_instance.state == InstanceState.RUNNING

    result = await finish(handle, runner_id_for(run_id, 2))
    assert result.state == RunState.COMPLETED
    assert result.snapshot_count == 1
    assert await instance_state(real_stack.compute, restored.instance_id) in (
        None,
        InstanceState.DELETED,
    )
    history = await handle.fetch_history()
    await Replayer(workflows=list(WORKFLOWS)).replay_workflow(history)


async def test_real_gateway_runs_suspend_together(real_stack: RealStack) -> None:
    # Four runs through a snapshot queue with two slots: requests wait for a slot.
    await real_stack.start_workers()
    runs = [await real_stack.start_run() for _ in range(4)]
    for run_id, handle in runs:
        await wait_for_state(handle, lambda v: v.state == RunState.EXECUTING, "EXECUTING")
        runner = runner_id_for(run_id, 1)
        await handle.signal(SIGNAL_RUNNER_STARTED, RunnerStarted(runner))
        await suspend(handle, runner, f"wp-{run_id}")

    for run_id, handle in runs:
        await wait_for_state(handle, lambda v: v.state == RunState.SUSPENDED, "SUSPENDED")
        await handle.signal(SIGNAL_WAITPOINT_COMPLETED, WaitpointCompleted(f"wp-{run_id}"))
    for run_id, handle in runs:
        await wait_for_state(handle, lambda v: v.restore_count == 1, "restored")
        result = await finish(handle, runner_id_for(run_id, 2))
        assert result.state == RunState.COMPLETED
        assert result.snapshot_count == 1


async def test_real_gateway_required_template(real_stack: RealStack) -> None:
    await real_stack.start_workers()
    seeded = seed_deployment(
        real_stack.sessions, workload_type=WorkloadType.MICROVM, image=real_stack.image
    )

    result = await real_stack.env.client.execute_workflow(
        DeployTemplateWorkflow.run,
        DeployTemplateInput(
            deployment_id=seeded.deployment_id, cpu=0.5, memory_gb=0.25, template_timeout_s=120
        ),
        id=deploy_workflow_id(seeded.deployment_id),
        task_queue=real_stack.task_queue,
    )

    assert result.template_mode == "required"
    assert result.status == "DEPLOYED"
    assert result.template_id is not None
    with session_scope(real_stack.sessions) as session:
        deployment = session.get(Deployment, seeded.deployment_id)
        assert deployment is not None
        assert deployment.template_id == result.template_id
        assert deployment.status == DeploymentStatus.DEPLOYED


async def test_real_gateway_lost_callback_is_reconciled(
    real_stack: RealStack, closed_tcp_port: int
) -> None:
    # Callbacks go to a port where nothing listens, so the gateway's callback is lost.
    await real_stack.start_workers(api_url=f"http://127.0.0.1:{closed_tcp_port}")
    run_id, handle = await real_stack.start_run(snapshot_callback_timeout_s=2.0)
    await wait_for_state(handle, lambda v: v.state == RunState.EXECUTING, "EXECUTING")
    runner = runner_id_for(run_id, 1)

    await suspend(handle, runner, "wp-lost")
    view = await wait_for_state(handle, lambda v: v.state == RunState.SUSPENDED, "SUSPENDED")
    assert view.snapshot_id is not None
    snapshot = await real_stack.compute.snapshots.get(view.snapshot_id)
    assert snapshot.state == SnapshotState.COMPLETED

    await handle.signal(SIGNAL_WAITPOINT_COMPLETED, WaitpointCompleted("wp-lost"))
    await wait_for_state(handle, lambda v: v.restore_count == 1, "restored")
    result = await finish(handle, runner_id_for(run_id, 2))
    assert result.state == RunState.COMPLETED


async def test_real_gateway_worker_restart_during_delay(real_stack: RealStack) -> None:
    await real_stack.start_workers()
    run_id, handle = await real_stack.start_run(snapshot_delay_ms=3_000)
    await wait_for_state(handle, lambda v: v.state == RunState.EXECUTING, "EXECUTING")
    runner = runner_id_for(run_id, 1)
    await suspend(handle, runner, "wp-restart")
    await wait_for_state(handle, lambda v: v.state == RunState.SUSPENDING, "SUSPENDING")

    # The delay is a server-side timer: a new worker takes the snapshot when it fires.
    await real_stack.stop_workers()
    await real_stack.start_workers()
    view = await wait_for_state(handle, lambda v: v.state == RunState.SUSPENDED, "SUSPENDED")
    assert view.snapshot_count == 1

    await handle.signal(SIGNAL_WAITPOINT_COMPLETED, WaitpointCompleted("wp-restart"))
    await wait_for_state(handle, lambda v: v.restore_count == 1, "restored")
    result = await finish(handle, runner_id_for(run_id, 2))
    assert result.state == RunState.COMPLETED
