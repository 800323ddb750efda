"""The orchestration harness: real workflows, activities, worker and Temporal; a gateway double.

Real: the Temporal dev server (a child process), `RunExecutionWorkflow`, the
worker that `worker.build_workers` builds, the gateway, database and span
activities, and a SQLite database migrated with vmflow's migrations.
Simulated: the compute gateway (the recording double of the workflow tests,
which returns at once and sends snapshot callbacks as signals) and the
runner, whose messages the harness signals the way the supervisor API would.
The worker runs in this process, so its memory is this process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from activities.database import DatabaseActivities, RunStatusInput, RunStatusResult
from activities.gateway import GatewayActivities
from activities.spans import SpanActivities
from bench.temporal_server import TemporalDevServer
from tests.workflows.gateway_double import RecordingGateway
from vmflow.compute.models import InstanceCreateRequest, InstanceCreateResponse
from vmflow.storage import migrate
from vmflow.storage.db import create_engine_from_url, session_factory, session_scope
from vmflow.storage.models import (
    Deployment,
    Organization,
    Project,
    TaskRun,
    WorkerInstanceGroup,
    WorkloadType,
)
from vmflow.telemetry import ComputeSpanRecorder, build_tracer_provider
from worker import GRACEFUL_SHUTDOWN, SYNC_ACTIVITY_THREADS, ActivitySet, build_workers
from workflows import contract

REAL_PARTS = (
    "real: Temporal dev server (SQLite file, WAL), RunExecutionWorkflow, worker.build_workers, "
    "gateway/database/span activities, SQLite database"
)
SIMULATED_PARTS = (
    "simulated: the compute gateway (tests/workflows/gateway_double.py, returns at once) and "
    "the runner and supervisor API (the harness sends their signals)"
)
API_URL = "http://127.0.0.1:9/bench-api"
SNAPSHOT_DISPATCH_LIMIT = 10
# Seconds any one run may take before the harness gives up on it; a safety net.
RUN_TIMEOUT_S = 600.0


class TimedDatabaseActivities(DatabaseActivities):
    """The real database activities, noting when each run status was stored."""

    def __init__(self, sessions: sessionmaker[Session], on_status: Callable[[str, str], None]):
        super().__init__(sessions, gateway_configured=True, shadow_rollout_pct=0.0)
        self._on_status = on_status

    @activity.defn(name="record_run_status")
    def record_run_status(self, input: RunStatusInput) -> RunStatusResult:
        result = super().record_run_status(input)
        self._on_status(input.run_id, input.status)
        return result


class _NotifyingInstances:
    """Wraps the double's `instances` to tell the harness which runner an instance got."""

    def __init__(self, inner: Any, on_create: Callable[[InstanceCreateRequest], None]) -> None:
        self._inner = inner
        self._on_create = on_create

    async def create(self, request: InstanceCreateRequest) -> InstanceCreateResponse:
        response: InstanceCreateResponse = await self._inner.create(request)
        self._on_create(request)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class StatusEvent:
    status: str
    at: float


class Orchestration:
    """A dev server, a database and a worker serving vmflow's workflows on fresh task queues."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server = TemporalDevServer(workdir / "temporal.db")
        self.database_url = f"sqlite:///{workdir / 'vmflow.db'}"
        self.task_queue = f"bench-{uuid.uuid4().hex[:8]}"
        self.snapshot_task_queue = f"{self.task_queue}-snapshots"
        self.deployment_id = ""
        self.statuses: dict[str, list[StatusEvent]] = defaultdict(list)
        self.created_runners: dict[str, asyncio.Future[str]] = {}
        self._status_changed: dict[str, asyncio.Event] = {}
        self._client: Client | None = None
        self._gateway: RecordingGateway | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(SYNC_ACTIVITY_THREADS, thread_name_prefix="bench")
        self._stack = contextlib.AsyncExitStack()
        self._sessions: sessionmaker[Session] | None = None
        self._engine: Any = None
        self._provider = build_tracer_provider(None)
        self._run_numbers = itertools.count(1)

    @property
    def client(self) -> Client:
        assert self._client is not None, "call start() first"
        return self._client

    @property
    def gateway(self) -> RecordingGateway:
        assert self._gateway is not None, "call start() first"
        return self._gateway

    async def start(
        self, extra_workers: Callable[[Client, ThreadPoolExecutor], list[Worker]] | None = None
    ) -> None:
        """Start the server, migrate and seed the database, and run the workers."""
        self._loop = asyncio.get_running_loop()
        self._client = await self.server.start()
        await asyncio.to_thread(migrate.upgrade, self.database_url)
        self._engine = create_engine_from_url(self.database_url)
        self._sessions = session_factory(self._engine)
        self.deployment_id = self._seed_deployment()

        gateway = RecordingGateway(self._client)
        gateway.instances = _NotifyingInstances(gateway.instances, self._instance_created)  # type: ignore[assignment]
        self._gateway = gateway
        activities = ActivitySet(
            gateway=GatewayActivities(
                gateway,  # type: ignore[arg-type]
                api_url=API_URL,
                issue_token=lambda run_id, deployment_id, runner_id: f"bench-token-{runner_id}",
            ),
            database=TimedDatabaseActivities(self._sessions, self._status_stored),
            spans=SpanActivities(ComputeSpanRecorder(self._provider)),
        )
        workers = build_workers(
            self._client,
            activities,
            snapshot_dispatch_limit=SNAPSHOT_DISPATCH_LIMIT,
            executor=self._executor,
            task_queue=self.task_queue,
            snapshot_task_queue=self.snapshot_task_queue,
        )
        if extra_workers is not None:
            workers += extra_workers(self._client, self._executor)
        for worker in workers:
            await self._stack.enter_async_context(worker)

    async def stop(self) -> None:
        try:
            await self._stack.aclose()
        finally:
            self._executor.shutdown(wait=True)
            if self._engine is not None:
                self._engine.dispose()
            self._provider.shutdown()
            self.server.stop()

    # Database

    def _seed_deployment(self) -> str:
        assert self._sessions is not None
        suffix = uuid.uuid4().hex[:10]
        with session_scope(self._sessions) as session:
            organization = Organization(slug=f"bench-{suffix}")
            group = WorkerInstanceGroup(name=f"bench-{suffix}", workload_type=WorkloadType.MICROVM)
            project = Project(
                organization=organization, slug=f"bench-{suffix}", default_worker_group=group
            )
            deployment = Deployment(project=project, version="1", image=f"bench:{suffix}")
            session.add_all([organization, group, project, deployment])
            session.flush()
            return deployment.id

    def seed_runs(self, count: int) -> list[str]:
        """Insert `count` runs of the deployment and return their ids."""
        assert self._sessions is not None
        run_ids = [
            f"run-bench-{next(self._run_numbers)}-{uuid.uuid4().hex[:6]}" for _ in range(count)
        ]
        with session_scope(self._sessions) as session:
            session.add_all(
                TaskRun(id=run_id, deployment_id=self.deployment_id, task_id="bench-noop")
                for run_id in run_ids
            )
        return run_ids

    # Notifications from the worker's threads

    def _status_stored(self, run_id: str, status: str) -> None:
        event = StatusEvent(status, time.monotonic())
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._note_status, run_id, event)

    def _note_status(self, run_id: str, event: StatusEvent) -> None:
        self.statuses[run_id].append(event)
        changed = self._status_changed.get(run_id)
        if changed is not None:
            changed.set()

    def _instance_created(self, request: InstanceCreateRequest) -> None:
        run_id = request.env["VMFLOW_RUN_ID"]
        future = self.created_runners.get(run_id)
        if future is not None and not future.done():
            future.set_result(request.env["VMFLOW_RUNNER_ID"])

    async def wait_for_status(self, run_id: str, status: str, *, after: float) -> float:
        """Wait until `run_id`'s `status` is stored at a monotonic time after `after`; return it."""
        changed = self._status_changed.setdefault(run_id, asyncio.Event())
        async with asyncio.timeout(RUN_TIMEOUT_S):
            while True:
                for event in self.statuses.get(run_id, []):
                    if event.status == status and event.at > after:
                        return event.at
                changed.clear()
                await changed.wait()

    def forget(self, run_id: str) -> None:
        """Drop what the harness keeps about a finished run."""
        self.statuses.pop(run_id, None)
        self._status_changed.pop(run_id, None)
        self.created_runners.pop(run_id, None)

    # Runs

    async def start_run(
        self, run_id: str, *, snapshot_delay_ms: int = 5_000
    ) -> tuple[WorkflowHandle[Any, Any], str]:
        """Start a run's workflow and wait for its instance; return the handle and runner id."""
        created: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.created_runners[run_id] = created
        handle = await self.client.start_workflow(
            contract.RUN_EXECUTION_WORKFLOW,
            contract.RunExecutionInput(
                run_id=run_id,
                deployment_id=self.deployment_id,
                image="bench:noop",
                snapshot_delay_ms=snapshot_delay_ms,
                snapshot_task_queue=self.snapshot_task_queue,
            ),
            id=contract.run_workflow_id(run_id),
            task_queue=self.task_queue,
            result_type=contract.RunExecutionResult,
        )
        async with asyncio.timeout(RUN_TIMEOUT_S):
            runner_id = await created
        await handle.signal(contract.SIGNAL_RUNNER_STARTED, contract.RunnerStarted(runner_id))
        return handle, runner_id

    async def finish_run(
        self, handle: WorkflowHandle[Any, Any], runner_id: str
    ) -> contract.RunExecutionResult:
        """Report the task's return from `runner_id` and wait for the workflow's result."""
        await handle.signal(
            contract.SIGNAL_RUNNER_FINISHED, contract.RunnerFinished(runner_id, ok=True)
        )
        async with asyncio.timeout(RUN_TIMEOUT_S):
            result: contract.RunExecutionResult = await handle.result()
        return result


async def gather_limited(coroutines: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Run the coroutine factories with at most `limit` in flight; return results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def guarded(factory: Callable[[], Awaitable[Any]]) -> Any:
        async with semaphore:
            return await factory()

    return await asyncio.gather(*(guarded(factory) for factory in coroutines))


@contextlib.asynccontextmanager
async def orchestration(
    extra_workers: Callable[[Client, ThreadPoolExecutor], list[Worker]] | None = None,
) -> Any:
    """Yield a started `Orchestration` in a temporary directory, then stop it and remove that."""
    with tempfile.TemporaryDirectory(prefix="vmflow-bench-") as directory:
        harness = Orchestration(Path(directory))
        try:
            await harness.start(extra_workers)
            yield harness
        finally:
            await harness.stop()


__all__ = ["GRACEFUL_SHUTDOWN", "Orchestration", "gather_limited", "orchestration"]
