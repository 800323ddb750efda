"""Platform routes against a real server, database and Temporal dev server."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio.client import WorkflowExecutionStatus

from tests.api.conftest import ApiServer, deploy, unique
from vmflow.storage.db import session_scope
from vmflow.storage.models import (
    CheckpointType,
    RunLogLine,
    TaskRun,
    TaskRunCheckpoint,
    TaskRunStatus,
    Waitpoint,
    WaitpointKind,
    WaitpointStatus,
    utc_now,
)
from workflows import contract


async def test_finalize_deployment_starts_deploy_workflow_once(api_server: ApiServer) -> None:
    body = {
        "project": unique("proj"),
        "version": "1.0.0",
        "image": "vmflow-examples:latest@sha256:" + "ab" * 32,
        "tasks": ["approval-report"],
    }
    async with api_server.http() as http:
        first = await http.post("/api/v1/deployments/finalize", json=body)
        assert first.status_code == 201, first.text
        deployment = first.json()
        handle = api_server.client.get_workflow_handle(deployment["workflow_id"])
        await handle.result(rpc_timeout=timedelta(seconds=20))
        first_run_id = (await handle.describe()).run_id

        retried = await http.post("/api/v1/deployments/finalize", json=body)
        fetched = await http.get(f"/api/v1/deployments/{deployment['id']}")

    assert deployment["workflow_id"] == contract.deploy_workflow_id(deployment["id"])
    assert deployment["image"] == "vmflow-examples:latest"
    assert deployment["status"] == "PENDING"
    assert retried.status_code == 200
    assert retried.json()["id"] == deployment["id"]
    assert (await handle.describe()).run_id == first_run_id
    assert fetched.status_code == 200
    assert fetched.json()["tasks"] == ["approval-report"]


async def test_finalize_deployment_rejects_changed_image(api_server: ApiServer) -> None:
    body = {
        "project": unique("proj"),
        "version": "2.0.0",
        "image": "app:one",
        "tasks": ["t"],
    }
    async with api_server.http() as http:
        first = await http.post("/api/v1/deployments/finalize", json=body)
        changed = await http.post("/api/v1/deployments/finalize", json={**body, "image": "app:two"})

    assert first.status_code == 201
    assert changed.status_code == 409
    assert changed.json()["error"] == "deployment_version_exists"
    assert "new version" in changed.json()["detail"]


async def test_trigger_starts_run_workflow_with_settings(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        response = await http.post(
            "/api/v1/tasks/approval-report/trigger",
            json={"payload": {"city": "Seattle"}, "deployment_id": deployment["id"]},
        )
    assert response.status_code == 201, response.text
    run = response.json()

    started = await api_server.wait_for_message(run["workflow_id"], "input")
    assert run["workflow_id"] == contract.run_workflow_id(run["run_id"])
    assert started["run_id"] == run["run_id"]
    assert started["deployment_id"] == deployment["id"]
    assert started["image"] == "vmflow-examples:latest"
    assert started["snapshot_delay_ms"] == 1234
    with session_scope(api_server.sessions) as session:
        row = session.get(TaskRun, run["run_id"])
        assert row is not None
        assert row.status is TaskRunStatus.PENDING
        assert row.payload == {"city": "Seattle"}


async def test_trigger_by_project_uses_deployed_deployment(api_server: ApiServer) -> None:
    project = unique("proj")
    deployment = await deploy(api_server, project=project)
    async with api_server.http() as http:
        response = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"project": project}
        )
    assert response.status_code == 201, response.text
    assert response.json()["deployment_id"] == deployment["id"]


async def test_trigger_idempotency_key_returns_first_run(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    body = {"deployment_id": deployment["id"], "idempotency_key": unique("key")}
    async with api_server.http() as http:
        first = await http.post("/api/v1/tasks/approval-report/trigger", json=body)
        second = await http.post("/api/v1/tasks/approval-report/trigger", json=body)

    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["run_id"] == first.json()["run_id"]
    assert second.json()["created"] is False


async def test_get_run_includes_waitpoints_and_checkpoints(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
        run_id = triggered.json()["run_id"]
        with session_scope(api_server.sessions) as session:
            session.add(Waitpoint(run_id=run_id, kind=WaitpointKind.TOKEN, idempotency_key="a"))
            session.add(
                TaskRunCheckpoint(run_id=run_id, type=CheckpointType.COMPUTE, location="snap-123")
            )
        response = await http.get(f"/api/v1/runs/{run_id}")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "PENDING"
    assert [waitpoint["kind"] for waitpoint in body["waitpoints"]] == ["TOKEN"]
    assert [checkpoint["location"] for checkpoint in body["checkpoints"]] == ["snap-123"]


async def test_list_runs_filters_and_pages(api_server: ApiServer) -> None:
    deployment = await deploy(api_server, tasks=["alpha", "beta"])
    async with api_server.http() as http:
        for task in ("alpha", "alpha", "alpha", "beta"):
            response = await http.post(
                f"/api/v1/tasks/{task}/trigger", json={"deployment_id": deployment["id"]}
            )
            assert response.status_code == 201
        first_page = await http.get(
            "/api/v1/runs",
            params={"deployment_id": deployment["id"], "task_id": "alpha", "limit": 2},
        )
        second_page = await http.get(
            "/api/v1/runs",
            params={
                "deployment_id": deployment["id"],
                "task_id": "alpha",
                "limit": 2,
                "offset": 2,
            },
        )
        by_status = await http.get(
            "/api/v1/runs", params={"deployment_id": deployment["id"], "status": "COMPLETED"}
        )

    assert len(first_page.json()["runs"]) == 2
    assert first_page.json()["next_offset"] == 2
    assert len(second_page.json()["runs"]) == 1
    assert second_page.json()["next_offset"] is None
    assert {run["task_id"] for run in first_page.json()["runs"]} == {"alpha"}
    assert by_status.json()["runs"] == []


async def test_cancel_run_cancels_workflow(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
        run_id = triggered.json()["run_id"]
        await api_server.wait_for_message(contract.run_workflow_id(run_id), "input")
        response = await http.post(f"/api/v1/runs/{run_id}/cancel")

    assert response.status_code == 202, response.text
    handle = api_server.client.get_workflow_handle(contract.run_workflow_id(run_id))
    deadline = asyncio.get_running_loop().time() + 20
    description = await handle.describe()
    while description.status is WorkflowExecutionStatus.RUNNING:
        assert asyncio.get_running_loop().time() < deadline, "run was not canceled within 20 s"
        await asyncio.sleep(0.05)
        description = await handle.describe()
    assert description.status is WorkflowExecutionStatus.CANCELED


async def test_cancel_times_out_pending_tokens(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
        run_id = triggered.json()["run_id"]
        await api_server.wait_for_message(contract.run_workflow_id(run_id), "input")
        with session_scope(api_server.sessions) as session:
            pending = Waitpoint(run_id=run_id, kind=WaitpointKind.TOKEN, idempotency_key="a")
            done = Waitpoint(
                run_id=run_id,
                kind=WaitpointKind.TOKEN,
                idempotency_key="b",
                status=WaitpointStatus.COMPLETED,
                output="kept",
            )
            session.add_all([pending, done])
            session.flush()
            pending_id, done_id = pending.id, done.id

        canceled = await http.post(f"/api/v1/runs/{run_id}/cancel")
        late = await http.post(
            f"/api/v1/waitpoints/tokens/{pending_id}/complete", json={"output": 1}
        )

    assert canceled.status_code == 202, canceled.text
    statuses = {item["id"]: item["status"] for item in canceled.json()["waitpoints"]}
    assert statuses == {pending_id: "TIMED_OUT", done_id: "COMPLETED"}
    assert late.status_code == 409, late.text
    assert late.json()["error"] == "waitpoint_not_pending"
    assert f"run {run_id} is" in late.json()["detail"]
    with session_scope(api_server.sessions) as session:
        stored = session.get(Waitpoint, pending_id)
        assert stored is not None
        assert stored.status is WaitpointStatus.TIMED_OUT
        assert stored.output is None
        assert stored.completed_at is not None
        kept = session.get(Waitpoint, done_id)
        assert kept is not None
        assert kept.output == "kept"


async def test_token_of_finished_run_conflicts(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
        run_id = triggered.json()["run_id"]
        with session_scope(api_server.sessions) as session:
            row = session.get(TaskRun, run_id)
            assert row is not None
            row.status = TaskRunStatus.CANCELED
            token = Waitpoint(run_id=run_id, kind=WaitpointKind.TOKEN, idempotency_key="t")
            session.add(token)
            session.flush()
            token_id = token.id
        response = await http.post(
            f"/api/v1/waitpoints/tokens/{token_id}/complete", json={"output": 1}
        )

    assert response.status_code == 409, response.text
    assert response.json()["error"] == "run_finished"
    assert "CANCELED" in response.json()["detail"]
    with session_scope(api_server.sessions) as session:
        stored = session.get(Waitpoint, token_id)
        assert stored is not None
        assert stored.status is WaitpointStatus.PENDING


async def test_cancel_finished_run_conflicts(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
        run_id = triggered.json()["run_id"]
        with session_scope(api_server.sessions) as session:
            row = session.get(TaskRun, run_id)
            assert row is not None
            row.status = TaskRunStatus.COMPLETED
        response = await http.post(f"/api/v1/runs/{run_id}/cancel")

    assert response.status_code == 409
    assert response.json()["error"] == "run_finished"
    assert "COMPLETED" in response.json()["detail"]


async def test_read_run_log_pages_after_line(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
        run_id = triggered.json()["run_id"]
        with session_scope(api_server.sessions) as session:
            for index in range(3):
                session.add(RunLogLine(run_id=run_id, message=f"line {index}", logged_at=utc_now()))
        first = await http.get(f"/api/v1/runs/{run_id}/logs", params={"limit": 2})
        rest = await http.get(
            f"/api/v1/runs/{run_id}/logs", params={"after": first.json()["next_after"]}
        )
        empty = await http.get(
            f"/api/v1/runs/{run_id}/logs", params={"after": rest.json()["next_after"]}
        )

    assert [line["message"] for line in first.json()["lines"]] == ["line 0", "line 1"]
    assert [line["message"] for line in rest.json()["lines"]] == ["line 2"]
    assert empty.json() == {"run_id": run_id, "lines": [], "next_after": None}


async def test_complete_token_delivers_update_once(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
        run_id = triggered.json()["run_id"]
        with session_scope(api_server.sessions) as session:
            waitpoint = Waitpoint(run_id=run_id, kind=WaitpointKind.TOKEN, idempotency_key="t")
            session.add(waitpoint)
            session.flush()
            token_id = waitpoint.id

        first = await http.post(
            f"/api/v1/waitpoints/tokens/{token_id}/complete", json={"output": {"ok": True}}
        )
        duplicate = await http.post(
            f"/api/v1/waitpoints/tokens/{token_id}/complete", json={"output": {"ok": False}}
        )

    assert first.status_code == 200, first.text
    assert first.json()["status"] == "COMPLETED"
    assert duplicate.status_code == 409
    assert "already COMPLETED" in duplicate.json()["detail"]
    update = await api_server.wait_for_message(
        contract.run_workflow_id(run_id), contract.UPDATE_COMPLETE_WAITPOINT
    )
    assert update["waitpoint_id"] == token_id
    assert update["output"] == {"ok": True}
    with session_scope(api_server.sessions) as session:
        row = session.get(Waitpoint, token_id)
        assert row is not None
        assert row.status is WaitpointStatus.COMPLETED
        assert row.output == {"ok": True}


async def test_complete_token_of_closed_run_stays_pending(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
        run_id = triggered.json()["run_id"]
        handle = api_server.client.get_workflow_handle(contract.run_workflow_id(run_id))
        await handle.terminate("test closes the run before its token completes")
        with session_scope(api_server.sessions) as session:
            waitpoint = Waitpoint(run_id=run_id, kind=WaitpointKind.TOKEN, idempotency_key="t")
            session.add(waitpoint)
            session.flush()
            token_id = waitpoint.id

        response = await http.post(
            f"/api/v1/waitpoints/tokens/{token_id}/complete", json={"output": 1}
        )

    assert response.status_code == 404, response.text
    assert response.json()["error"] == "workflow_not_found"
    with session_scope(api_server.sessions) as session:
        row = session.get(Waitpoint, token_id)
        assert row is not None
        assert row.status is WaitpointStatus.PENDING
        assert row.output is None


async def test_concurrent_finalize_creates_one_deployment(api_server: ApiServer) -> None:
    body = {"project": unique("proj"), "version": "1", "image": "app:1", "tasks": ["t"]}
    async with api_server.http() as http:
        responses = await asyncio.gather(
            *(http.post("/api/v1/deployments/finalize", json=body) for _ in range(5))
        )

    for response in responses:
        assert response.status_code in (200, 201), response.text
    assert len({response.json()["id"] for response in responses}) == 1
    assert [response.status_code for response in responses].count(201) == 1


async def test_concurrent_triggers_share_idempotency_key(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    body = {"deployment_id": deployment["id"], "idempotency_key": unique("key")}
    async with api_server.http() as http:
        responses = await asyncio.gather(
            *(http.post("/api/v1/tasks/approval-report/trigger", json=body) for _ in range(5))
        )

    for response in responses:
        assert response.status_code in (200, 201), response.text
    assert len({response.json()["run_id"] for response in responses}) == 1
    assert [response.json()["created"] for response in responses].count(True) == 1
