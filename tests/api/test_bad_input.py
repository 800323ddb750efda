"""Bad input at the API: each gets a 4xx that names the problem, and nothing is lost."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import func, select
from temporalio.client import Client
from temporalio.service import RetryConfig

from tests.api.conftest import ApiServer, deploy, start_uvicorn, stop_uvicorn, unique
from vmflow.api.app import create_app
from vmflow.storage.db import session_scope
from vmflow.storage.models import TaskRun, Waitpoint, WaitpointKind


def _run_count(api: ApiServer, deployment_id: str) -> int:
    with session_scope(api.sessions) as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(TaskRun)
                .where(TaskRun.deployment_id == deployment_id)
            )
            or 0
        )


async def test_malformed_json_is_400(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        response = await http.post(
            "/api/v1/tasks/approval-report/trigger",
            content=b'{"deployment_id": "' + deployment["id"].encode() + b'", "payload": {',
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["error"] == "malformed_json"
    assert "not valid JSON" in response.json()["detail"]
    assert _run_count(api_server, deployment["id"]) == 0


async def test_invalid_field_is_422_naming_it(api_server: ApiServer) -> None:
    async with api_server.http() as http:
        response = await http.post(
            "/api/v1/deployments/finalize",
            json={"project": "Bad Slug!", "version": "1", "image": "a:b", "tasks": ["t"]},
        )
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    assert "body.project" in response.json()["detail"]


async def test_unknown_field_is_422(api_server: ApiServer) -> None:
    async with api_server.http() as http:
        response = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"project": "p", "paylaod": 1}
        )
    assert response.status_code == 422
    assert "paylaod" in response.json()["detail"]


async def test_unknown_task_is_404_listing_known(api_server: ApiServer) -> None:
    deployment = await deploy(api_server, tasks=["approval-report", "duration-wait"])
    async with api_server.http() as http:
        response = await http.post(
            "/api/v1/tasks/no-such-task/trigger", json={"deployment_id": deployment["id"]}
        )
    assert response.status_code == 404
    assert response.json()["error"] == "task_not_found"
    assert "'no-such-task'" in response.json()["detail"]
    assert "approval-report, duration-wait" in response.json()["detail"]
    assert _run_count(api_server, deployment["id"]) == 0


async def test_unknown_project_and_deployment_are_404(api_server: ApiServer) -> None:
    async with api_server.http() as http:
        no_project = await http.post("/api/v1/tasks/t/trigger", json={"project": unique("missing")})
        no_deployment = await http.post(
            "/api/v1/tasks/t/trigger", json={"deployment_id": "dep_missing"}
        )
        get_deployment = await http.get("/api/v1/deployments/dep_missing")
    assert no_project.status_code == 404
    assert no_project.json()["error"] == "project_not_found"
    assert no_deployment.status_code == 404
    assert no_deployment.json()["error"] == "deployment_not_found"
    assert get_deployment.status_code == 404


async def test_undeployed_deployment_is_409(api_server: ApiServer) -> None:
    async with api_server.http() as http:
        finalized = await http.post(
            "/api/v1/deployments/finalize",
            json={"project": unique("proj"), "version": "1", "image": "a:b", "tasks": ["t"]},
        )
        response = await http.post(
            "/api/v1/tasks/t/trigger", json={"deployment_id": finalized.json()["id"]}
        )
    assert response.status_code == 409
    assert response.json()["error"] == "deployment_not_deployed"
    assert "PENDING" in response.json()["detail"]


async def test_unknown_run_is_404_on_every_run_route(api_server: ApiServer) -> None:
    async with api_server.http() as http:
        responses = [
            await http.get("/api/v1/runs/run_missing"),
            await http.get("/api/v1/runs/run_missing/logs"),
            await http.post("/api/v1/runs/run_missing/cancel"),
        ]
    for response in responses:
        assert response.status_code == 404, response.request.url
        assert response.json()["error"] == "run_not_found"
        assert "'run_missing'" in response.json()["detail"]


async def test_unknown_token_is_404(api_server: ApiServer) -> None:
    async with api_server.http() as http:
        response = await http.post(
            "/api/v1/waitpoints/tokens/wp_missing/complete", json={"output": 1}
        )
    assert response.status_code == 404
    assert response.json()["error"] == "waitpoint_not_found"


async def test_duration_waitpoint_cannot_be_completed(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
        with session_scope(api_server.sessions) as session:
            waitpoint = Waitpoint(
                run_id=triggered.json()["run_id"],
                kind=WaitpointKind.DURATION,
                idempotency_key="d",
            )
            session.add(waitpoint)
            session.flush()
            waitpoint_id = waitpoint.id
        response = await http.post(
            f"/api/v1/waitpoints/tokens/{waitpoint_id}/complete", json={"output": 1}
        )
    assert response.status_code == 409
    assert "DURATION" in response.json()["detail"]


# Raw bodies, because httpx will not encode a lone surrogate or NaN itself.
_NON_STRICT_PAYLOADS = [
    pytest.param(b'"\\ud800"', "surrogate", "body.payload", id="lone-surrogate"),
    pytest.param(b'{"a": ["x", "\\udc00"]}', "surrogate", "value['a'][1]", id="nested-surrogate"),
    pytest.param(b'{"\\ud800": 1}', "surrogate", "key", id="surrogate-key"),
    pytest.param(b"NaN", "nan", "must be finite", id="nan"),
    pytest.param(b"1e999", "inf", "must be finite", id="overflow"),
    pytest.param(b"[-Infinity]", "-inf", "value[0]", id="negative-infinity"),
]


@pytest.mark.parametrize(("payload", "problem", "location"), _NON_STRICT_PAYLOADS)
async def test_trigger_rejects_non_strict_json(
    api_server: ApiServer, payload: bytes, problem: str, location: str
) -> None:
    deployment = await deploy(api_server)
    body = b'{"deployment_id": "' + deployment["id"].encode() + b'", "payload": ' + payload + b"}"
    async with api_server.http() as http:
        response = await http.post(
            "/api/v1/tasks/approval-report/trigger",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        listed = await http.get("/api/v1/runs", params={"limit": 5})

    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_request"
    assert problem in response.json()["detail"]
    assert location in response.json()["detail"]
    assert _run_count(api_server, deployment["id"]) == 0
    assert listed.status_code == 200, listed.text


async def test_token_output_rejects_non_strict_json(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
        with session_scope(api_server.sessions) as session:
            waitpoint = Waitpoint(
                run_id=triggered.json()["run_id"], kind=WaitpointKind.TOKEN, idempotency_key="t"
            )
            session.add(waitpoint)
            session.flush()
            waitpoint_id = waitpoint.id
        responses = [
            await http.post(
                f"/api/v1/waitpoints/tokens/{waitpoint_id}/complete",
                content=b'{"output": ' + output + b"}",
                headers={"Content-Type": "application/json"},
            )
            for output in (b'{"ok": NaN}', b'"\\ud800"')
        ]

    for response in responses:
        assert response.status_code == 422, response.text
        assert "body.output" in response.json()["detail"]
    with session_scope(api_server.sessions) as session:
        stored = session.get(Waitpoint, waitpoint_id)
        assert stored is not None
        assert stored.status.value == "PENDING"
        assert stored.output is None


async def test_payload_over_limit_is_413(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    oversized = {"deployment_id": deployment["id"], "payload": "x" * (64 * 1024)}
    async with api_server.http() as http:
        response = await http.post("/api/v1/tasks/approval-report/trigger", json=oversized)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert "65536 bytes" in response.json()["detail"]
    assert _run_count(api_server, deployment["id"]) == 0


async def test_chunked_payload_over_limit_is_413(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    prefix = b'{"deployment_id": "' + deployment["id"].encode() + b'", "payload": "'

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must apply to the streamed bytes.
        yield prefix
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'

    async with api_server.http() as http:
        response = await http.post(
            "/api/v1/tasks/approval-report/trigger",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert _run_count(api_server, deployment["id"]) == 0


async def test_rejected_requests_leave_earlier_run_intact(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        good = await http.post(
            "/api/v1/tasks/approval-report/trigger",
            json={"deployment_id": deployment["id"], "payload": {"n": 1}},
        )
        await http.post(
            "/api/v1/tasks/approval-report/trigger",
            content=b"{",
            headers={"Content-Type": "application/json"},
        )
        await http.post("/api/v1/tasks/missing/trigger", json={"deployment_id": deployment["id"]})
        fetched = await http.get(f"/api/v1/runs/{good.json()['run_id']}")
    assert fetched.status_code == 200
    assert fetched.json()["payload"] == {"n": 1}
    assert _run_count(api_server, deployment["id"]) == 1


async def test_unknown_route_and_method_name_the_problem(api_server: ApiServer) -> None:
    async with api_server.http() as http:
        missing = await http.get("/api/v1/nothing-here")
        wrong_method = await http.delete("/api/v1/runs")
    assert missing.status_code == 404
    assert "/api/v1/nothing-here" in missing.json()["detail"]
    assert wrong_method.status_code == 405
    assert "DELETE" in wrong_method.json()["detail"]


async def test_trigger_without_temporal_is_503_and_keeps_nothing(
    api_server: ApiServer, closed_tcp_port: int
) -> None:
    deployment = await deploy(api_server)
    # A lazy client to a port nothing listens on, with no retries, so the
    # first RPC fails at once as if Temporal were down.
    unreachable = await Client.connect(
        f"127.0.0.1:{closed_tcp_port}", lazy=True, retry_config=RetryConfig(max_retries=0)
    )
    app = create_app(api_server.settings, temporal_client=unreachable, sessions=api_server.sessions)
    server, task, url = await start_uvicorn(app)
    try:
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {api_server.api_key}"}
        ) as http:
            response = await http.post(
                "/api/v1/tasks/approval-report/trigger",
                json={"deployment_id": deployment["id"], "idempotency_key": unique("key")},
            )
    finally:
        await stop_uvicorn(server, task)

    assert response.status_code == 503, response.text
    assert response.json()["error"] == "orchestration_unavailable"
    assert "TEMPORAL_ADDRESS" in response.json()["detail"]
    assert _run_count(api_server, deployment["id"]) == 0
