"""worker.py as a process: it serves the main task queue and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from tests.workflows.conftest import seed_deployment
from workflows.contract import MAIN_TASK_QUEUE, DeployTemplateInput, deploy_workflow_id
from workflows.deploy_template import DeployTemplateWorkflow

WORKER = Path(__file__).resolve().parents[2] / "worker.py"
# Seconds to wait for the process to start or stop; a safety net, not a measurement.
PROCESS_WAIT_S = 60.0


async def read_until(stream: asyncio.StreamReader, marker: str, seen: list[str]) -> None:
    async with asyncio.timeout(PROCESS_WAIT_S):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"worker exited before logging {marker!r}: {seen}")
            seen.append(line)
            if marker in line:
                return


async def test_worker_serves_and_stops_on_sigterm(
    temporal_dev_env: WorkflowEnvironment,
    sqlite_database_url: str,
    sessions: sessionmaker[Session],
) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPUTE_", "VMFLOW_", "OTEL_"))
    }
    env.update(
        TEMPORAL_ADDRESS=temporal_dev_env.client.service_client.config.target_host,
        DATABASE_URL=sqlite_database_url,
        VMFLOW_WORKLOAD_SECRET="worker-test-secret",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    seen: list[str] = []
    try:
        await read_until(process.stderr, "worker serving", seen)
        assert f"{MAIN_TASK_QUEUE} and vmflow-snapshots (10 snapshot slots)" in seen[-1]

        # No gateway is configured, so the deployment skips its template.
        seeded = seed_deployment(sessions)
        result = await temporal_dev_env.client.execute_workflow(
            DeployTemplateWorkflow.run,
            DeployTemplateInput(deployment_id=seeded.deployment_id),
            id=deploy_workflow_id(seeded.deployment_id),
            task_queue=MAIN_TASK_QUEUE,
        )
        assert result.template_mode == "skip"
        assert result.status == "DEPLOYED"

        process.send_signal(signal.SIGTERM)
        await read_until(process.stderr, "worker stopped", seen)
        async with asyncio.timeout(PROCESS_WAIT_S):
            status = await process.wait()
        assert status == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_worker_without_workload_secret_exits(sqlite_database_url: str) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPUTE_", "VMFLOW_", "OTEL_"))
    }
    env["DATABASE_URL"] = sqlite_database_url
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(PROCESS_WAIT_S):
        _, stderr = await process.communicate()

    assert process.returncode == 2
    assert b"VMFLOW_WORKLOAD_SECRET is not set" in stderr
