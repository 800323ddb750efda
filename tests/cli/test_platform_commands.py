"""deploy, trigger, runs and waitpoint commands against a real API server.

Each command runs in a worker thread because it makes blocking HTTP calls to a
server that serves from this test's event loop.
"""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

from click.testing import Result
from rich.console import Console
from typer.testing import CliRunner

from tests.api.conftest import ApiServer, deploy, unique
from vmflow.cli.main import app
from vmflow.cli.runs import runs_table
from vmflow.gateway.images import ImageStore
from vmflow.storage.db import session_scope
from vmflow.storage.models import (
    RunLogLine,
    TaskRun,
    TaskRunStatus,
    Waitpoint,
    WaitpointKind,
    new_id,
    utc_now,
)
from workflows import contract

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Square brackets check that the CLI prints the traceback as text, not as rich markup.
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/tasks.py", line 12, in approval_report\n'
    "    months = [load(month) for month in range(12)]\n"
    "ValueError: bad year"
)


async def invoke(api: ApiServer, *args: str, **env: str) -> Result:
    environment = {
        "VMFLOW_API_URL": api.url,
        "VMFLOW_API_KEY": api.api_key,
        "COLUMNS": "200",
        **env,
    }
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, app, list(args), env=environment)


def _run_id(output: str) -> str:
    match = re.search(r"run (run_[0-9a-f]+)", output)
    assert match, output
    return match.group(1)


async def test_deploy_with_explicit_tasks(api_server: ApiServer) -> None:
    project = unique("proj")
    result = await invoke(
        api_server,
        "deploy",
        "app:1",
        "--project",
        project,
        "--version",
        "1",
        "--task",
        "alpha",
        "--task",
        "beta",
        "--no-wait",
    )
    assert result.exit_code == 0, result.output
    assert f"of {project} version 1: alpha, beta" in result.output


async def test_deploy_reads_tasks_from_local_image(api_server: ApiServer, tmp_path: Path) -> None:
    image_dir = tmp_path / "images"
    ImageStore(image_dir).build(EXAMPLES / "duration-wait", "duration-wait:test")
    result = await invoke(
        api_server,
        "deploy",
        "duration-wait:test",
        "--project",
        unique("proj"),
        "--no-wait",
        VMFLOW_GATEWAY_IMAGE_DIR=str(image_dir),
    )
    assert result.exit_code == 0, result.output
    assert "duration-wait, duration-wait-async" in result.output


async def test_deploy_missing_image_names_fix(api_server: ApiServer, tmp_path: Path) -> None:
    result = await invoke(
        api_server,
        "deploy",
        "nothing:here",
        "--no-wait",
        VMFLOW_GATEWAY_IMAGE_DIR=str(tmp_path / "empty"),
    )
    assert result.exit_code == 1
    assert "vmflow image build" in result.output


async def test_deploy_without_tag_reuses_latest(api_server: ApiServer, tmp_path: Path) -> None:
    image_dir = str(tmp_path / "images")
    ImageStore(Path(image_dir)).build(EXAMPLES / "duration-wait", "duration-wait:latest")
    project = unique("proj")

    tagged = await invoke(
        api_server,
        *("deploy", "duration-wait:latest", "--project", project, "--no-wait"),
        VMFLOW_GATEWAY_IMAGE_DIR=image_dir,
    )
    untagged = await invoke(
        api_server,
        *("deploy", "duration-wait", "--project", project, "--no-wait"),
        VMFLOW_GATEWAY_IMAGE_DIR=image_dir,
    )

    assert tagged.exit_code == 0, tagged.output
    assert untagged.exit_code == 0, untagged.output
    deployment_id = re.search(r"deployment (dep_[0-9a-f]+)", tagged.output)
    assert deployment_id, tagged.output
    assert f"deployment {deployment_id.group(1)} " in untagged.output


async def test_redeploy_makes_deployment_current(api_server: ApiServer) -> None:
    project = unique("proj")
    first = await deploy(api_server, project=project, tasks=["approval-report"])
    await deploy(api_server, project=project, tasks=["duration-wait"])

    hidden = await invoke(api_server, "trigger", "approval-report", "--project", project)
    redeployed = await invoke(
        api_server,
        *("deploy", first["image"], "--project", project, "--version", first["version"]),
        *("--task", "approval-report", "--timeout", "30"),
    )
    triggered = await invoke(api_server, "trigger", "approval-report", "--project", project)

    assert hidden.exit_code == 1
    assert "not defined in deployment" in hidden.output
    assert "--deployment DEPLOYMENT_ID" in hidden.output
    assert "--project" in hidden.output
    assert redeployed.exit_code == 0, redeployed.output
    assert f"deployment {first['id']} " in redeployed.output
    assert f"now {first['id']}" in redeployed.output
    assert triggered.exit_code == 0, triggered.output
    with session_scope(api_server.sessions) as session:
        run = session.get(TaskRun, _run_id(triggered.output))
        assert run is not None
        assert run.deployment_id == first["id"]


async def test_trigger_wait_shows_state_changes(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    command = asyncio.create_task(
        invoke(
            api_server,
            "trigger",
            "approval-report",
            "--deployment",
            deployment["id"],
            "--payload",
            '{"year": 2015}',
            "--wait",
            "--timeout",
            "60",
        )
    )

    # Play the worker's part: move the run through its states in the database.
    run_id = await _wait_for_run(api_server, deployment["id"])
    for status, output in (
        (TaskRunStatus.EXECUTING, None),
        (TaskRunStatus.SUSPENDED, None),
        (TaskRunStatus.COMPLETED, {"report": "done"}),
    ):
        await asyncio.sleep(0.6)
        with session_scope(api_server.sessions) as session:
            run = session.get(TaskRun, run_id)
            assert run is not None
            run.status = status
            run.output = output
            if status == TaskRunStatus.SUSPENDED:
                token = Waitpoint(run_id=run_id, kind=WaitpointKind.TOKEN, idempotency_key="a")
                session.add(token)
                session.flush()
                token_id = token.id

    result = await asyncio.wait_for(command, timeout=60)
    assert result.exit_code == 0, result.output
    assert _run_id(result.output) == run_id
    for status in ("PENDING", "EXECUTING", "SUSPENDED", "COMPLETED"):
        assert f"status {status}" in result.output
    assert f"run {run_id} waits for token {token_id}" in result.output
    assert f"vmflow waitpoint complete {token_id} --output" in result.output
    assert result.output.count(f"waits for token {token_id}") == 1
    assert '"report": "done"' in result.output


async def _wait_for_run(api: ApiServer, deployment_id: str) -> str:
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        with session_scope(api.sessions) as session:
            run = session.query(TaskRun).filter_by(deployment_id=deployment_id).one_or_none()
            if run is not None:
                return run.id
        await asyncio.sleep(0.05)
    raise AssertionError(f"no run of deployment {deployment_id} within 30 s")


async def test_trigger_failed_run_exits_1(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    command = asyncio.create_task(
        invoke(
            api_server,
            "trigger",
            "approval-report",
            "--deployment",
            deployment["id"],
            "--wait",
            "--timeout",
            "60",
        )
    )
    run_id = await _wait_for_run(api_server, deployment["id"])
    with session_scope(api_server.sessions) as session:
        run = session.get(TaskRun, run_id)
        assert run is not None
        run.status = TaskRunStatus.FAILED
        run.error = {"name": "ValueError", "message": "bad year", "traceback": TRACEBACK}

    result = await asyncio.wait_for(command, timeout=60)
    got = await invoke(api_server, "runs", "get", run_id)

    assert result.exit_code == 1
    assert "ValueError: bad year" in result.output
    assert TRACEBACK in result.output
    assert got.exit_code == 0, got.output
    assert "ValueError: bad year" in got.output
    assert TRACEBACK in got.output


async def test_runs_get_list_logs_cancel(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    triggered = await invoke(
        api_server, "trigger", "approval-report", "--deployment", deployment["id"]
    )
    run_id = _run_id(triggered.output)
    await api_server.wait_for_message(contract.run_workflow_id(run_id), "input")
    with session_scope(api_server.sessions) as session:
        session.add(RunLogLine(run_id=run_id, message="aggregated 12 months", logged_at=utc_now()))

    got = await invoke(api_server, "runs", "get", run_id)
    listed = await invoke(api_server, "runs", "list", "--deployment", deployment["id"])
    logs = await invoke(api_server, "runs", "logs", run_id)
    canceled = await invoke(api_server, "runs", "cancel", run_id)
    canceled_again_missing = await invoke(api_server, "runs", "cancel", "run_missing")

    assert got.exit_code == 0, got.output
    assert "PENDING" in got.output
    assert listed.exit_code == 0
    assert run_id in listed.output
    assert logs.exit_code == 0
    assert "aggregated 12 months" in logs.output
    assert canceled.exit_code == 0, canceled.output
    assert "cancellation requested" in canceled.output
    assert canceled_again_missing.exit_code == 1
    assert "404" in canceled_again_missing.output


async def test_runs_list_piped_is_tab_separated(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    triggered = await invoke(
        api_server, "trigger", "approval-report", "--deployment", deployment["id"]
    )
    run_id = _run_id(triggered.output)

    listed = await invoke(
        api_server, "runs", "list", "--deployment", deployment["id"], COLUMNS="80"
    )

    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert len(lines) == 1, listed.output
    fields = lines[0].split("\t")
    assert fields[:3] == [run_id, "approval-report", "PENDING"]
    assert fields[4] == "-"


def test_runs_table_keeps_ids_whole_at_80_columns() -> None:
    runs = [
        {
            "id": new_id("run"),
            "task_id": "approval-report-with-a-long-name",
            "status": "COMPLETED",
            "created_at": "2026-12-04T21:26:16.123456+00:00",
            "finished_at": "2026-12-04T21:27:16.123456+00:00",
        }
        for _ in range(3)
    ]
    terminal = Console(width=80, file=io.StringIO(), force_terminal=True, color_system=None)

    terminal.print(runs_table(runs))

    rendered = terminal.file.getvalue()
    assert all(len(line) <= 80 for line in rendered.splitlines()), rendered
    for run in runs:
        assert run["id"] in rendered, rendered
    assert "…" not in rendered, rendered


async def test_waitpoint_complete_and_duplicate(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    triggered = await invoke(
        api_server, "trigger", "approval-report", "--deployment", deployment["id"]
    )
    run_id = _run_id(triggered.output)
    with session_scope(api_server.sessions) as session:
        waitpoint = Waitpoint(run_id=run_id, kind=WaitpointKind.TOKEN, idempotency_key="a")
        session.add(waitpoint)
        session.flush()
        token_id = waitpoint.id

    first = await invoke(
        api_server, "waitpoint", "complete", token_id, "--output", '{"approver": "me"}'
    )
    second = await invoke(api_server, "waitpoint", "complete", token_id)
    invalid = await invoke(api_server, "waitpoint", "complete", token_id, "--output", "{")

    assert first.exit_code == 0, first.output
    assert f"completed token {token_id}" in first.output
    assert second.exit_code == 1
    assert "409" in second.output
    assert "already COMPLETED" in second.output
    assert invalid.exit_code == 2
    assert "--output is not valid JSON" in invalid.output


async def test_wrong_api_key_exits_1(api_server: ApiServer) -> None:
    result = await invoke(api_server, "runs", "list", VMFLOW_API_KEY="wrong")
    assert result.exit_code == 1
    assert "401" in result.output


async def test_unreachable_api_names_fix(api_server: ApiServer, closed_tcp_port: int) -> None:
    result = await invoke(
        api_server, "runs", "list", VMFLOW_API_URL=f"http://127.0.0.1:{closed_tcp_port}"
    )
    assert result.exit_code == 1
    assert "cannot reach the vmflow API" in result.output
    assert "vmflow dev" in result.output


async def test_api_trigger_defaults_to_default_project(api_server: ApiServer) -> None:
    task = unique("task")
    deployment = await deploy(api_server, project="default", tasks=[task])

    async with api_server.http() as http:
        response = await http.post(f"/api/v1/tasks/{task}/trigger", json={"payload": None})

    assert response.status_code == 201, response.text
    assert response.json()["deployment_id"] == deployment["id"]
