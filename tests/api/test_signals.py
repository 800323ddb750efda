"""Gateway callbacks and workload API calls arrive at the workflows as the contract's signals."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from tests.api.conftest import ApiServer, deploy, unique
from vmflow.api.tokens import issue_workload_token
from vmflow.compute.signing import SIGNATURE_HEADER, sign
from workflows import contract


def _signed(api: ApiServer, payload: dict[str, Any]) -> dict[str, Any]:
    assert api.settings.VMFLOW_CALLBACK_SECRET is not None
    body = json.dumps(payload).encode()
    signature = sign(body, api.settings.VMFLOW_CALLBACK_SECRET.get_secret_value())
    return {
        "content": body,
        "headers": {"Content-Type": "application/json", SIGNATURE_HEADER: signature},
    }


async def _triggered_run(api: ApiServer) -> tuple[str, str]:
    deployment = await deploy(api)
    async with api.http() as http:
        response = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
    run_id: str = response.json()["run_id"]
    await api.wait_for_message(contract.run_workflow_id(run_id), "input")
    return run_id, deployment["id"]


async def test_snapshot_callback_signals_run(api_server: ApiServer) -> None:
    run_id, _ = await _triggered_run(api_server)
    callback = {
        "status": "completed",
        "snapshot_id": "snap-1",
        "instance_id": "inst-1",
        "metadata": {"run_id": run_id, "runner_id": f"{run_id}-r1", "snapshot_request_id": "1"},
        "duration_ms": 71.5,
    }
    async with api_server.http(key=None) as http:
        response = await http.post(contract.SNAPSHOT_CALLBACK_PATH, **_signed(api_server, callback))

    assert response.status_code == 202, response.text
    signal = await api_server.wait_for_message(
        contract.run_workflow_id(run_id), contract.SIGNAL_SNAPSHOT_FINISHED
    )
    assert signal["status"] == "completed"
    assert signal["snapshot_id"] == "snap-1"
    assert signal["instance_id"] == "inst-1"
    assert signal["metadata"]["runner_id"] == f"{run_id}-r1"
    assert signal["duration_ms"] == 71.5
    assert signal["received_at_ns"] > 0


async def test_snapshot_callback_without_run_id_is_422(api_server: ApiServer) -> None:
    callback = {"status": "failed", "instance_id": "inst-1", "error": "boom", "metadata": {}}
    async with api_server.http(key=None) as http:
        response = await http.post(contract.SNAPSHOT_CALLBACK_PATH, **_signed(api_server, callback))
    assert response.status_code == 422
    assert "'run_id'" in response.json()["detail"]


async def test_snapshot_callback_invalid_body_is_422(api_server: ApiServer) -> None:
    callback = {"status": "exploded", "metadata": {"run_id": "run_x"}}
    async with api_server.http(key=None) as http:
        response = await http.post(contract.SNAPSHOT_CALLBACK_PATH, **_signed(api_server, callback))
    assert response.status_code == 422
    assert "status" in response.json()["detail"]
    assert "instance_id" in response.json()["detail"]


async def test_snapshot_callback_for_unknown_run_is_404(api_server: ApiServer) -> None:
    callback = {"status": "completed", "instance_id": "i", "metadata": {"run_id": "run_gone"}}
    async with api_server.http(key=None) as http:
        response = await http.post(contract.SNAPSHOT_CALLBACK_PATH, **_signed(api_server, callback))
    assert response.status_code == 404
    assert "run-run_gone" in response.json()["detail"]


async def test_template_callback_signals_template_build(api_server: ApiServer) -> None:
    deployment_id = unique("dep")
    handle = await api_server.client.start_workflow(
        contract.TEMPLATE_BUILD_WORKFLOW,
        deployment_id,
        id=contract.template_build_workflow_id(deployment_id),
        task_queue=api_server.task_queue,
    )
    callback = {
        "template_id": "tpl-1",
        "image": "vmflow-examples:latest",
        "status": "completed",
        "metadata": {"deployment_id": deployment_id},
        "duration_ms": 812.0,
    }
    async with api_server.http(key=None) as http:
        response = await http.post(contract.TEMPLATE_CALLBACK_PATH, **_signed(api_server, callback))

    assert response.status_code == 202, response.text
    result = await handle.result(rpc_timeout=timedelta(seconds=20))
    assert result["template_id"] == "tpl-1"
    assert result["status"] == "completed"
    assert result["metadata"] == {"deployment_id": deployment_id}


async def test_workload_calls_become_run_signals(api_server: ApiServer) -> None:
    run_id, deployment_id = await _triggered_run(api_server)
    assert api_server.settings.VMFLOW_WORKLOAD_SECRET is not None
    token = issue_workload_token(
        api_server.settings.VMFLOW_WORKLOAD_SECRET.get_secret_value(),
        run_id,
        deployment_id,
        ttl_s=600,
    )
    runner_id = contract.runner_id_for(run_id, 1)
    workflow_id = contract.run_workflow_id(run_id)
    prefix = f"/api/v1/workload/runs/{run_id}"

    async with api_server.http(key=token) as http:
        started = await http.post(f"{prefix}/start", json={"runner_id": runner_id})
        created = await http.post(
            f"{prefix}/waitpoints",
            json={"runner_id": runner_id, "kind": "TOKEN", "idempotency_key": "approval"},
        )
        waitpoint_id = created.json()["id"]
        suspended = await http.post(
            f"{prefix}/suspend",
            json={"runner_id": runner_id, "waitpoint_id": waitpoint_id, "execution_snapshot_id": 3},
        )
        resumed = await http.post(
            f"{prefix}/resume", json={"runner_id": runner_id, "waitpoint_id": waitpoint_id}
        )
        completed = await http.post(
            f"{prefix}/complete", json={"runner_id": runner_id, "output": {"rows": 365}}
        )

    for response in (started, created, suspended, resumed, completed):
        assert response.status_code == 200, response.text
    assert (await api_server.wait_for_message(workflow_id, "runner_started"))[
        "runner_id"
    ] == runner_id
    suspend = await api_server.wait_for_message(workflow_id, "suspend_requested")
    assert suspend["waitpoint_id"] == waitpoint_id
    assert suspend["kind"] == "TOKEN"
    assert suspend["execution_snapshot_id"] == "3"
    resume = await api_server.wait_for_message(workflow_id, "runner_resumed")
    assert resume["waitpoint_id"] == waitpoint_id
    finished = await api_server.wait_for_message(workflow_id, "runner_finished")
    assert finished["ok"] is True
    assert finished["output"] == {"rows": 365}


async def test_workload_event_for_closed_run_is_dropped(api_server: ApiServer) -> None:
    run_id, deployment_id = await _triggered_run(api_server)
    handle = api_server.client.get_workflow_handle(contract.run_workflow_id(run_id))
    await handle.terminate("test closes the run before its runner starts")
    assert api_server.settings.VMFLOW_WORKLOAD_SECRET is not None
    token = issue_workload_token(
        api_server.settings.VMFLOW_WORKLOAD_SECRET.get_secret_value(),
        run_id,
        deployment_id,
        ttl_s=600,
    )

    async with api_server.http(key=token) as http:
        response = await http.post(
            f"/api/v1/workload/runs/{run_id}/start",
            json={"runner_id": contract.runner_id_for(run_id, 1)},
        )

    assert response.status_code == 200, response.text
