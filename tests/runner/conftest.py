"""Fixtures of the runner tests: a real workload API server and an instance channel.

`workload_server` serves the workload router with uvicorn on 127.0.0.1 over a
migrated SQLite file and records run events in memory. `host_channel` runs
the gateway's channel server on a Unix socket of the host, so the runner
agent can run as a host process. Tests of the real sandbox go through the
whole gateway instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.servers import serve_app_in_thread
from vmflow.api.app import handle_validation_error
from vmflow.api.events import RecordingRunEvents
from vmflow.api.tokens import issue_workload_token
from vmflow.api.workload import install_workload_api
from vmflow.gateway.channel import ChannelServer
from vmflow.storage.db import create_engine_from_url, session_factory, session_scope
from vmflow.storage.models import (
    Deployment,
    Organization,
    Project,
    RunLogLine,
    TaskRun,
    Waitpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_TASKS_DIR = Path(__file__).parent / "sample_tasks"
EXAMPLES_DIR = REPO_ROOT / "examples"

ResultT = TypeVar("ResultT")


def wait_until(probe: Callable[[], ResultT | None], *, timeout_s: float, message: str) -> ResultT:
    """Call `probe` every 50 ms until it returns a truthy value; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s: {message}", pytrace=False)
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# Workload API server


@dataclass
class WorkloadServer:
    url: str
    secret: str
    sessions: sessionmaker[Session]
    events: RecordingRunEvents
    callbacks: list[dict[str, Any]]

    @property
    def callback_url(self) -> str:
        """A route of this server that keeps every gateway callback posted to it."""
        return f"{self.url}/test-callbacks"

    def token(
        self, run_id: str, deployment_id: str, ttl_s: int = 3600, runner_id: str | None = None
    ) -> str:
        return issue_workload_token(self.secret, run_id, deployment_id, ttl_s, runner_id=runner_id)

    def create_run(self, task_id: str, payload: Any = None) -> TaskRun:
        """Insert an organization, project, deployment and a PENDING run of `task_id`."""
        suffix = uuid.uuid4().hex[:10]
        with session_scope(self.sessions) as session:
            organization = Organization(slug=f"org-{suffix}")
            session.add(organization)
            session.flush()
            project = Project(organization_id=organization.id, slug=f"proj-{suffix}")
            session.add(project)
            session.flush()
            deployment = Deployment(project_id=project.id, version="1", image=f"img-{suffix}:1")
            session.add(deployment)
            session.flush()
            run = TaskRun(deployment_id=deployment.id, task_id=task_id, payload=payload)
            session.add(run)
            session.flush()
            session.expunge(run)
            return run

    def get_run(self, run_id: str) -> TaskRun:
        with session_scope(self.sessions) as session:
            run = session.get(TaskRun, run_id)
            assert run is not None, f"run {run_id} not found"
            session.expunge(run)
            return run

    def waitpoints(self, run_id: str) -> list[Waitpoint]:
        with session_scope(self.sessions) as session:
            rows = list(
                session.scalars(
                    select(Waitpoint)
                    .where(Waitpoint.run_id == run_id)
                    .order_by(Waitpoint.created_at)
                )
            )
            for row in rows:
                session.expunge(row)
            return rows

    def log_messages(self, run_id: str) -> list[str]:
        with session_scope(self.sessions) as session:
            return list(
                session.scalars(
                    select(RunLogLine.message)
                    .where(RunLogLine.run_id == run_id)
                    .order_by(RunLogLine.id)
                )
            )


@contextlib.contextmanager
def running_workload_server(sessions: sessionmaker[Session]) -> Iterator[WorkloadServer]:
    events = RecordingRunEvents()
    secret = f"secret-{uuid.uuid4().hex}"
    callbacks: list[dict[str, Any]] = []
    app = FastAPI()
    # The supervisor's own 422 handler: FastAPI's default one echoes the rejected
    # input, and fails on the NaN and lone surrogates the API rejects.
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    install_workload_api(app, session_factory=sessions, events=events, secret=secret)

    @app.post("/test-callbacks", status_code=204)
    async def keep_callback(body: dict[str, Any]) -> None:
        callbacks.append(body)

    with serve_app_in_thread(app) as url:
        yield WorkloadServer(
            url=url, secret=secret, sessions=sessions, events=events, callbacks=callbacks
        )


@pytest.fixture
def workload_server(sqlite_database_url: str) -> Iterator[WorkloadServer]:
    """The workload API on 127.0.0.1 over a migrated SQLite file, events recorded in memory."""
    engine = create_engine_from_url(sqlite_database_url)
    try:
        with running_workload_server(session_factory(engine)) as server:
            yield server
    finally:
        engine.dispose()


@pytest.fixture
def workload_server_any_db(db_session_factory: sessionmaker[Session]) -> Iterator[WorkloadServer]:
    """The workload API over `database_url`, once per backend (SQLite and PostgreSQL)."""
    with running_workload_server(db_session_factory) as server:
        yield server


# ---------------------------------------------------------------------------
# Instance channel


@dataclass
class HostChannel:
    """The gateway's `ChannelServer` for an agent that runs as a host process.

    The server runs on an event loop in a thread of its own. `pause()` stops
    accepting, as the gateway does while it takes a snapshot, and `resume()`
    accepts again. `restore()` applies a restore's metadata: a new runner id
    and a higher generation.
    """

    socket_path: Path
    identity: dict[str, Any]
    ready_count: int = 0
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _server: ChannelServer | None = None

    def start(self) -> None:
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self._server = ChannelServer(
            self.socket_path,
            identity=lambda: self.identity,
            on_ready=self._count_ready,
            label="test-channel",
        )
        self._call(self._server.start())

    def _count_ready(self) -> None:
        self.ready_count += 1

    def _call(self, coroutine: Coroutine[Any, Any, ResultT]) -> ResultT:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    @property
    def server(self) -> ChannelServer:
        assert self._server is not None, "the channel is not started"
        return self._server

    def set_run(self, server: WorkloadServer, run: TaskRun, runner_id: str) -> None:
        self.server.set_workload(server.url, server.token(run.id, run.deployment_id))
        self.identity["env"] = {
            "VMFLOW_RUN_ID": run.id,
            "VMFLOW_RUNNER_ID": runner_id,
            "VMFLOW_DEPLOYMENT_ID": run.deployment_id,
        }

    def restore(self, runner_id: str, snapshot_id: str) -> None:
        self.identity = {
            **self.identity,
            "id": f"inst-{uuid.uuid4().hex[:8]}",
            "env": {**self.identity["env"], "VMFLOW_RUNNER_ID": runner_id},
            "metadata": {"VMFLOW_RUNNER_ID": runner_id},
            "generation": self.identity["generation"] + 1,
            "restored_from": snapshot_id,
        }

    def pause(self) -> None:
        self._call(self.server.pause())

    def resume(self) -> None:
        self._call(self.server.resume())

    def close(self) -> None:
        if self._server is not None:
            self._call(self._server.close())
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture
def host_channel() -> Iterator[HostChannel]:
    # AF_UNIX paths are limited to 108 bytes, so the socket lives under /tmp.
    directory = Path(f"/tmp/vmflow-channel-{uuid.uuid4().hex[:12]}")
    channel = HostChannel(
        socket_path=directory / "channel.sock",
        identity={
            "id": f"inst-{uuid.uuid4().hex[:8]}",
            "name": "test-instance",
            "image": "sample:1",
            "env": {},
            "metadata": {},
            "generation": 0,
            "restored_from": None,
        },
    )
    channel.start()
    try:
        yield channel
    finally:
        channel.close()
        with contextlib.suppress(OSError):
            directory.rmdir()


# ---------------------------------------------------------------------------
# Agent processes


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_exit(self, timeout_s: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"runner agent did not exit within {timeout_s} s; stderr:\n{self.stderr()}",
                pytrace=False,
            )


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start `python -m vmflow.runner.agent` on a channel with the given task modules."""
    started: list[AgentProcess] = []

    def start(
        channel: HostChannel,
        modules: str = "sample_tasks",
        path: Path = SAMPLE_TASKS_DIR,
        retry_deadline_s: float | None = None,
    ) -> AgentProcess:
        stderr_path = tmp_path / f"agent-{len(started)}.stderr"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.pathsep.join([str(path), str(REPO_ROOT)]),
            "VMFLOW_CHANNEL": str(channel.socket_path),
            "VMFLOW_TASK_MODULES": modules,
        }
        if retry_deadline_s is not None:
            env["VMFLOW_CHANNEL_RETRY_DEADLINE_S"] = str(retry_deadline_s)
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "vmflow.runner.agent"],
                cwd=path,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        agent = AgentProcess(process, stderr_path)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait(timeout=10)
