"""Fixtures of the supervisor API tests: a real uvicorn server, real databases, real Temporal.

The workflows behind the API are stand-ins registered under the contract's
names on a task queue of this package, so each test can read back exactly
which signals, updates and cancellations the API delivered.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from sqlalchemy.orm import Session, sessionmaker
from temporalio import workflow
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from vmflow.api.app import create_app
from vmflow.config import Settings, load_settings
from vmflow.storage.db import session_scope
from vmflow.storage.models import Deployment, DeploymentStatus, utc_now
from workflows import contract

QUERY_MESSAGES = "test_messages"


@workflow.defn(name=contract.RUN_EXECUTION_WORKFLOW, sandboxed=False)
class RecordingRunWorkflow:
    """Stands in for RunExecutionWorkflow: records every message until canceled or finished."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.completed_waitpoints: set[str] = set()
        self.finished = False

    @workflow.run
    async def run(self, run_input: contract.RunExecutionInput) -> dict[str, Any]:
        self.messages.append({"name": "input", **asdict(run_input)})
        await workflow.wait_condition(lambda: self.finished)
        return {"run_id": run_input.run_id}

    def _record(self, name: str, message: Any) -> None:
        self.messages.append({"name": name, **asdict(message)})

    @workflow.signal(name=contract.SIGNAL_RUNNER_STARTED)
    def runner_started(self, message: contract.RunnerStarted) -> None:
        self._record(contract.SIGNAL_RUNNER_STARTED, message)

    @workflow.signal(name=contract.SIGNAL_SUSPEND_REQUESTED)
    def suspend_requested(self, message: contract.SuspendRequested) -> None:
        self._record(contract.SIGNAL_SUSPEND_REQUESTED, message)

    @workflow.signal(name=contract.SIGNAL_SNAPSHOT_FINISHED)
    def snapshot_finished(self, message: contract.SnapshotFinished) -> None:
        self._record(contract.SIGNAL_SNAPSHOT_FINISHED, message)

    @workflow.signal(name=contract.SIGNAL_RUNNER_RESUMED)
    def runner_resumed(self, message: contract.RunnerResumed) -> None:
        self._record(contract.SIGNAL_RUNNER_RESUMED, message)

    @workflow.signal(name=contract.SIGNAL_RUNNER_FINISHED)
    def runner_finished(self, message: contract.RunnerFinished) -> None:
        self._record(contract.SIGNAL_RUNNER_FINISHED, message)
        self.finished = True

    @workflow.update(name=contract.UPDATE_COMPLETE_WAITPOINT)
    def complete_waitpoint(
        self, message: contract.WaitpointCompleted
    ) -> contract.CompleteWaitpointResult:
        accepted = message.waitpoint_id not in self.completed_waitpoints
        self.completed_waitpoints.add(message.waitpoint_id)
        self._record(contract.UPDATE_COMPLETE_WAITPOINT, message)
        return contract.CompleteWaitpointResult(
            accepted=accepted, state=contract.RunState.SUSPENDED
        )

    @workflow.query(name=QUERY_MESSAGES)
    def recorded(self) -> list[dict[str, Any]]:
        return self.messages


@workflow.defn(name=contract.DEPLOY_TEMPLATE_WORKFLOW, sandboxed=False)
class RecordingDeployWorkflow:
    """Stands in for DeployTemplateWorkflow: returns at once with the deployment id."""

    @workflow.run
    async def run(self, deploy_input: contract.DeployTemplateInput) -> str:
        return deploy_input.deployment_id


@workflow.defn(name=contract.TEMPLATE_BUILD_WORKFLOW, sandboxed=False)
class RecordingTemplateBuildWorkflow:
    """Stands in for TemplateBuildWorkflow: returns the first `template_finished` it receives."""

    def __init__(self) -> None:
        self.finished: contract.TemplateFinished | None = None

    @workflow.run
    async def run(self, deployment_id: str) -> dict[str, Any]:
        await workflow.wait_condition(lambda: self.finished is not None)
        assert self.finished is not None
        return asdict(self.finished)

    @workflow.signal(name=contract.SIGNAL_TEMPLATE_FINISHED)
    def template_finished(self, message: contract.TemplateFinished) -> None:
        self.finished = message


@dataclass
class ApiServer:
    """A running supervisor API and what a test needs to talk to it and check its effects."""

    url: str
    settings: Settings
    api_key: str
    client: Client
    task_queue: str
    sessions: sessionmaker[Session]

    def http(self, *, key: str | None = "default", **kwargs: Any) -> httpx.AsyncClient:
        """An httpx client on the API; `key=None` sends no Authorization header."""
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {self.api_key if key == 'default' else key}"
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kwargs)

    async def messages(self, workflow_id: str) -> list[dict[str, Any]]:
        handle = self.client.get_workflow_handle(workflow_id)
        result: list[dict[str, Any]] = await handle.query(QUERY_MESSAGES)
        return result

    async def wait_for_message(
        self, workflow_id: str, name: str, timeout_s: float = 20
    ) -> dict[str, Any]:
        """Poll the stand-in workflow until it has recorded a message called `name`."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            for message in await self.messages(workflow_id):
                if message["name"] == name:
                    return message
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{workflow_id} received no {name} within {timeout_s} s")
            await asyncio.sleep(0.05)

    def mark_deployed(self, deployment_id: str) -> None:
        """Do what DeployTemplateWorkflow does at its end: mark the deployment DEPLOYED."""
        with session_scope(self.sessions) as session:
            deployment = session.get(Deployment, deployment_id)
            assert deployment is not None
            deployment.status = DeploymentStatus.DEPLOYED
            deployment.deployed_at = utc_now()


@pytest.fixture(scope="session")
def api_task_queue() -> str:
    return f"api-tests-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def stand_in_worker(
    temporal_dev_env: WorkflowEnvironment, api_task_queue: str
) -> AsyncIterator[Worker]:
    worker = Worker(
        temporal_dev_env.client,
        task_queue=api_task_queue,
        workflows=[RecordingRunWorkflow, RecordingDeployWorkflow, RecordingTemplateBuildWorkflow],
    )
    async with worker:
        yield worker


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "VMFLOW_API_KEY": secrets.token_urlsafe(24),
        "VMFLOW_WORKLOAD_SECRET": secrets.token_urlsafe(24),
        "VMFLOW_CALLBACK_SECRET": secrets.token_urlsafe(24),
        "COMPUTE_SNAPSHOT_DELAY_MS": 1234,
    }
    values.update(overrides)
    return load_settings(**values)


async def start_uvicorn(app: Any) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    """Serve `app` on 127.0.0.1 on a port the OS picks; return the server, its task and URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = asyncio.get_running_loop().time() + 20
    while not server.started:
        if task.done():
            task.result()
            raise AssertionError("uvicorn exited before it started")
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("uvicorn did not start within 20 s")
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, f"http://127.0.0.1:{port}"


async def stop_uvicorn(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    await asyncio.wait_for(task, timeout=20)


@pytest_asyncio.fixture(loop_scope="session")
async def api_server(
    database_url: str,
    db_session_factory: sessionmaker[Session],
    temporal_dev_env: WorkflowEnvironment,
    stand_in_worker: Worker,
    api_task_queue: str,
) -> AsyncIterator[ApiServer]:
    """The supervisor API on a free port of 127.0.0.1, on `database_url` and the dev server."""
    settings = make_settings(database_url)
    app = create_app(
        settings,
        temporal_client=temporal_dev_env.client,
        sessions=db_session_factory,
        max_body_bytes=64 * 1024,
        task_queue=api_task_queue,
    )
    server, task, url = await start_uvicorn(app)
    assert settings.VMFLOW_API_KEY is not None
    try:
        yield ApiServer(
            url=url,
            settings=settings,
            api_key=settings.VMFLOW_API_KEY.get_secret_value(),
            client=temporal_dev_env.client,
            task_queue=api_task_queue,
            sessions=db_session_factory,
        )
    finally:
        await stop_uvicorn(server, task)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def deploy(
    api: ApiServer, *, project: str | None = None, tasks: list[str] | None = None
) -> dict[str, Any]:
    """Finalize a deployment through the API and mark it DEPLOYED; return its JSON."""
    async with api.http() as http:
        response = await http.post(
            "/api/v1/deployments/finalize",
            json={
                "project": project or unique("proj"),
                "version": unique("v"),
                "image": "vmflow-examples:latest",
                "tasks": tasks or ["approval-report"],
            },
        )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    handle = api.client.get_workflow_handle(body["workflow_id"])
    await handle.result(rpc_timeout=timedelta(seconds=20))
    api.mark_deployed(body["id"])
    return body
