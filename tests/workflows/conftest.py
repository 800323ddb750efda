"""Fixtures for workflow tests: a worker on the time-skipping server, a gateway double, rows."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from activities.database import DatabaseActivities
from activities.gateway import GatewayActivities
from activities.spans import SpanActivities
from tests.workflows.gateway_double import RecordingGateway
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
from worker import WORKFLOWS, ActivitySet, build_workers
from workflows.contract import SEARCH_ATTRIBUTES

HISTORY_DIR = Path(__file__).parent / "histories"
# Set to 1 to (re)write the recorded histories that test_replay.py replays.
RECORD_HISTORIES = os.environ.get("VMFLOW_RECORD_HISTORIES") == "1"

API_URL = "http://127.0.0.1:9/vmflow-api"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def workflow_env(temporal_test_env: WorkflowEnvironment) -> WorkflowEnvironment:
    """The time-skipping server with vmflow's search attributes registered."""
    request = AddSearchAttributesRequest(
        namespace=temporal_test_env.client.namespace,
        search_attributes={
            key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in SEARCH_ATTRIBUTES
        },
    )
    with contextlib.suppress(RPCError):  # already registered by an earlier session fixture
        await temporal_test_env.client.operator_service.add_search_attributes(request)
    return temporal_test_env


@dataclass
class Seeded:
    organization_id: str
    project_id: str
    deployment_id: str
    image: str


def seed_deployment(
    sessions: sessionmaker[Session],
    *,
    workload_type: WorkloadType = WorkloadType.CONTAINER,
    feature_flags: dict[str, Any] | None = None,
    with_group: bool = True,
    deployment_id: str | None = None,
    image: str | None = None,
) -> Seeded:
    """Insert an organization, a project with its default worker group, and a deployment."""
    suffix = uuid.uuid4().hex[:10]
    image = image or f"registry.test:5000/team/app:{suffix}@sha256:{'ab' * 32}"
    with session_scope(sessions) as session:
        organization = Organization(slug=f"org-{suffix}", feature_flags=feature_flags or {})
        group = WorkerInstanceGroup(name=f"group-{suffix}", workload_type=workload_type)
        project = Project(
            organization=organization,
            slug=f"proj-{suffix}",
            default_worker_group=group if with_group else None,
        )
        deployment = Deployment(project=project, version="1", image=image)
        if deployment_id is not None:
            deployment.id = deployment_id
        session.add_all([organization, group, project, deployment])
        session.flush()
        return Seeded(organization.id, project.id, deployment.id, image)


def seed_run(sessions: sessionmaker[Session], deployment_id: str, run_id: str) -> None:
    with session_scope(sessions) as session:
        session.add(TaskRun(id=run_id, deployment_id=deployment_id, task_id="hello"))


@dataclass
class Harness:
    """Workers on task queues of this test, with the gateway double and the database."""

    env: WorkflowEnvironment
    gateway: RecordingGateway
    sessions: sessionmaker[Session]
    spans: InMemorySpanExporter
    recorder: ComputeSpanRecorder
    task_queue: str
    snapshot_task_queue: str
    snapshot_dispatch_limit: int
    executor: ThreadPoolExecutor
    gateway_configured: bool = True
    shadow_rollout_pct: float = 0.0
    max_cached_workflows: int = 1000
    # The supervisor API URL the activities send to the gateway.
    api_url: str = API_URL
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def client(self) -> Client:
        return self.env.client

    def activities(self) -> ActivitySet:
        return ActivitySet(
            gateway=GatewayActivities(
                self.gateway if self.gateway_configured else None,  # type: ignore[arg-type]
                api_url=self.api_url,
                issue_token=lambda run_id, deployment_id, runner_id: (
                    f"token-{runner_id}-{uuid.uuid4().hex[:6]}"
                ),
            ),
            database=DatabaseActivities(
                self.sessions,
                gateway_configured=self.gateway_configured,
                shadow_rollout_pct=self.shadow_rollout_pct,
            ),
            spans=SpanActivities(self.recorder),
        )

    async def start_workers(self) -> None:
        for worker in build_workers(
            self.client,
            self.activities(),
            snapshot_dispatch_limit=self.snapshot_dispatch_limit,
            executor=self.executor,
            task_queue=self.task_queue,
            snapshot_task_queue=self.snapshot_task_queue,
            max_cached_workflows=self.max_cached_workflows,
        ):
            await self._stack.enter_async_context(worker)

    async def stop_workers(self) -> None:
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()


async def assert_replays(handle: WorkflowHandle[Any, Any], name: str | None = None) -> None:
    """Replay the workflow's recorded history; write it to HISTORY_DIR when recording."""
    history = await handle.fetch_history()
    await Replayer(workflows=list(WORKFLOWS)).replay_workflow(history)
    if RECORD_HISTORIES and name is not None:
        path = HISTORY_DIR / f"{name}.json"
        path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")


@pytest.fixture
def sessions(sqlite_database_url: str) -> Any:
    engine = create_engine_from_url(sqlite_database_url)
    yield session_factory(engine)
    engine.dispose()


@contextlib.asynccontextmanager
async def running_harness(
    env: WorkflowEnvironment, sessions: sessionmaker[Session]
) -> AsyncIterator[Harness]:
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(None, exporter=exporter)
    executor = ThreadPoolExecutor(4)
    harness = Harness(
        env=env,
        gateway=RecordingGateway(env.client),
        sessions=sessions,
        spans=exporter,
        recorder=ComputeSpanRecorder(provider),
        task_queue=new_id("tq"),
        snapshot_task_queue=new_id("tq-snap"),
        snapshot_dispatch_limit=3,
        executor=executor,
    )
    try:
        yield harness
    finally:
        await harness.stop_workers()
        executor.shutdown(wait=True)
        provider.shutdown()


@pytest_asyncio.fixture(loop_scope="session")
async def harness(
    workflow_env: WorkflowEnvironment, sessions: sessionmaker[Session]
) -> AsyncIterator[Harness]:
    """A harness on the time-skipping server."""
    async with running_harness(workflow_env, sessions) as harness:
        yield harness


@pytest_asyncio.fixture(loop_scope="session")
async def dev_harness(
    temporal_dev_env: WorkflowEnvironment, sessions: sessionmaker[Session]
) -> AsyncIterator[Harness]:
    """A harness on the dev server, for workflows that need no time skipping.

    NOTE: on the time-skipping test server (temporal-test-server 1.40), a parent
    workflow that completes while its abandoned child still runs makes later
    `env.sleep` calls wait in real time. Shadow template builds do exactly that.
    """
    async with running_harness(temporal_dev_env, sessions) as harness:
        yield harness
