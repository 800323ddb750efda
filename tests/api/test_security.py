"""Credentials on every route: API key, workload tokens and callback signatures."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.api.conftest import ApiServer, deploy, make_settings
from vmflow.api.app import OPENAPI_PATH, create_app
from vmflow.api.security import MissingSecretError
from vmflow.api.tokens import issue_workload_token
from vmflow.compute.signing import SIGNATURE_HEADER, sign
from workflows import contract


def _api_routes(api: ApiServer) -> list[tuple[str, str]]:
    """Return (method, path) of every /api route, with path parameters filled in."""
    # The OpenAPI document lists every route, however routers are nested.
    document = create_app(api.settings, sessions=api.sessions).openapi()
    routes = [("GET", OPENAPI_PATH)]
    for template, operations in document["paths"].items():
        if template.startswith("/api/"):
            path = re.sub(r"\{[^}]+\}", "some-id", template)
            routes.extend((method.upper(), path) for method in sorted(operations))
    return routes


async def test_every_api_route_rejects_missing_credentials(api_server: ApiServer) -> None:
    routes = _api_routes(api_server)
    assert len(routes) >= 15
    async with api_server.http(key=None) as http:
        for method, path in routes:
            response = await http.request(method, path, json={})
            assert response.status_code == 401, f"{method} {path}: {response.status_code}"


async def test_every_platform_route_rejects_wrong_key(api_server: ApiServer) -> None:
    platform = [
        (method, path)
        for method, path in _api_routes(api_server)
        if "/workload/" not in path and "/callbacks/" not in path
    ]
    async with api_server.http(key="not-the-key") as http:
        for method, path in platform:
            response = await http.request(method, path, json={})
            assert response.status_code == 401, f"{method} {path}: {response.status_code}"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_missing_and_wrong_api_key_look_alike(api_server: ApiServer) -> None:
    async with api_server.http(key=None) as http:
        missing = await http.get("/api/v1/runs")
    async with api_server.http(key=api_server.api_key + "x") as http:
        wrong = await http.get("/api/v1/runs")
    assert missing.status_code == wrong.status_code == 401
    assert missing.json() == wrong.json()


async def test_openapi_document_needs_api_key(api_server: ApiServer) -> None:
    async with api_server.http(key=None) as http:
        default_paths = [await http.get(path) for path in ("/openapi.json", "/docs", "/redoc")]
    async with api_server.http() as http:
        document = await http.get(OPENAPI_PATH)

    for response in default_paths:
        assert response.status_code == 404, response.request.url
    assert document.status_code == 200
    paths = document.json()["paths"]
    assert "/api/v1/tasks/{task_id}/trigger" in paths
    assert "/api/v1/deployments/finalize" in paths
    assert contract.SNAPSHOT_CALLBACK_PATH in paths
    assert "/api/v1/workload/runs/{run_id}/start" in paths


async def test_healthz_needs_no_credentials(api_server: ApiServer) -> None:
    async with api_server.http(key=None) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_workload_token_missing_and_wrong_look_alike(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    async with api_server.http() as http:
        triggered = await http.post(
            "/api/v1/tasks/approval-report/trigger", json={"deployment_id": deployment["id"]}
        )
    run_id = triggered.json()["run_id"]
    path = f"/api/v1/workload/runs/{run_id}/start"
    body = {"runner_id": contract.runner_id_for(run_id, 1)}
    assert api_server.settings.VMFLOW_WORKLOAD_SECRET is not None
    secret = api_server.settings.VMFLOW_WORKLOAD_SECRET.get_secret_value()
    expired = issue_workload_token(
        secret, run_id, deployment["id"], ttl_s=1, now=time.time() - 3600
    )
    forged = issue_workload_token("another-secret", run_id, deployment["id"], ttl_s=60)

    responses = {}
    for label, key in (("missing", None), ("expired", expired), ("forged", forged)):
        async with api_server.http(key=key) as http:
            responses[label] = await http.post(path, json=body)

    for label, response in responses.items():
        assert response.status_code == 401, label
    assert responses["missing"].json() == responses["expired"].json()
    assert responses["missing"].json() == responses["forged"].json()


async def test_workload_token_of_other_run_is_forbidden(api_server: ApiServer) -> None:
    deployment = await deploy(api_server)
    assert api_server.settings.VMFLOW_WORKLOAD_SECRET is not None
    token = issue_workload_token(
        api_server.settings.VMFLOW_WORKLOAD_SECRET.get_secret_value(),
        "run_other",
        deployment["id"],
        ttl_s=60,
    )
    async with api_server.http(key=token) as http:
        response = await http.post(
            "/api/v1/workload/runs/run_mine/start", json={"runner_id": "run_mine-r1"}
        )
    assert response.status_code == 403


async def test_callback_rejects_bad_signatures(api_server: ApiServer) -> None:
    assert api_server.settings.VMFLOW_CALLBACK_SECRET is not None
    secret = api_server.settings.VMFLOW_CALLBACK_SECRET.get_secret_value()
    body = json.dumps(
        {"status": "completed", "instance_id": "i-1", "metadata": {"run_id": "run_x"}}
    ).encode()
    cases = {
        "missing": {},
        "wrong secret": {SIGNATURE_HEADER: sign(body, "another-secret")},
        "stale": {SIGNATURE_HEADER: sign(body, secret, timestamp=int(time.time()) - 3600)},
        "other body": {SIGNATURE_HEADER: sign(body + b" ", secret)},
        "malformed": {SIGNATURE_HEADER: "v1=abc"},
    }
    async with api_server.http(key=None) as http:
        for label, headers in cases.items():
            response = await http.post(
                contract.SNAPSHOT_CALLBACK_PATH,
                content=body,
                headers={"Content-Type": "application/json", **headers},
            )
            assert response.status_code == 401, label
            assert "signature" in response.json()["detail"], label


async def test_api_key_is_not_logged(
    api_server: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    async with api_server.http(key=api_server.api_key + "-wrong") as http:
        await http.get("/api/v1/runs")
    async with api_server.http() as http:
        await http.get("/api/v1/runs")
    assert "rejected request without a valid API key" in caplog.text
    assert api_server.api_key not in caplog.text


def test_create_app_requires_each_secret(sqlite_database_url: str) -> None:
    for name in ("VMFLOW_API_KEY", "VMFLOW_WORKLOAD_SECRET", "VMFLOW_CALLBACK_SECRET"):
        settings = make_settings(sqlite_database_url, **{name: None})
        with pytest.raises(MissingSecretError, match=name):
            create_app(settings)
