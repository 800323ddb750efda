"""The workload API over HTTP, on SQLite and PostgreSQL: auth, runner checks, idempotency."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.runner.conftest import WorkloadServer
from vmflow.api.waitpoints import WaitpointOutputError, WaitpointStateError, complete_token
from vmflow.storage.db import session_scope
from vmflow.storage.models import TaskRun, TaskRunStatus

PREFIX = "/api/v1/workload"


class RunClient:
    """Calls one run's workload routes with its token, as the channel proxy does."""

    def __init__(self, server: WorkloadServer, run: TaskRun, token: str | None = None) -> None:
        self.run = run
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.token = token if token is not None else server.token(run.id, run.deployment_id)

    def post(self, route: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(
            f"{PREFIX}/runs/{self.run.id}{route}",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        )

    def post_raw(self, route: str, body: bytes) -> httpx.Response:
        """Post `body` as it is, for JSON that httpx will not encode (NaN, lone surrogates)."""
        return self.http.post(
            f"{PREFIX}/runs/{self.run.id}{route}",
            content=body,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )

    def get(self, route: str) -> httpx.Response:
        return self.http.get(
            f"{PREFIX}/runs/{self.run.id}{route}",
            headers={"Authorization": f"Bearer {self.token}"},
        )


def _runner() -> str:
    return f"runner-{uuid.uuid4().hex[:8]}"


def test_workload_missing_and_wrong_token_get_same_401(
    workload_server_any_db: WorkloadServer,
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    url = f"{server.url}{PREFIX}/runs/{run.id}/start"

    missing = httpx.post(url, json={"runner_id": "r"})
    wrong = httpx.post(url, json={"runner_id": "r"}, headers={"Authorization": "Bearer x.y"})
    other_secret = httpx.post(
        url,
        json={"runner_id": "r"},
        headers={"Authorization": "Bearer " + "a" * 20 + "." + "b" * 43},
    )

    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert other_secret.status_code == 401
    assert missing.json() == wrong.json() == other_secret.json()
    assert missing.json()["detail"]["code"] == "unauthorized"
    assert server.get_run(run.id).status is TaskRunStatus.PENDING


def test_workload_token_of_other_run_is_forbidden(
    workload_server_any_db: WorkloadServer,
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    other = server.create_run("echo")
    client = RunClient(server, run, token=server.token(other.id, other.deployment_id))

    response = client.post("/start", {"runner_id": _runner()})

    assert response.status_code == 403
    assert response.json()["detail"]["code"] == "wrong_run"
    assert other.id in response.json()["detail"]["message"]


def test_workload_start_returns_execution(workload_server_any_db: WorkloadServer) -> None:
    server = workload_server_any_db
    run = server.create_run("echo", {"n": 1})
    client = RunClient(server, run)
    runner_id = _runner()

    response = client.post("/start", {"runner_id": runner_id})

    assert response.status_code == 200, response.text
    assert response.json() == {
        "run_id": run.id,
        "task_id": "echo",
        "payload": {"n": 1},
        "attempt": 1,
        "deployment_id": run.deployment_id,
        "runner_id": runner_id,
    }
    stored = server.get_run(run.id)
    assert stored.status is TaskRunStatus.EXECUTING
    assert stored.runner_id == runner_id
    assert [event.name for event in server.events.for_run(run.id)] == ["runner_started"]


def test_workload_stale_runner_cannot_finish(workload_server_any_db: WorkloadServer) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    old, new = f"{run.id}-r1", f"{run.id}-r2"
    client.post("/start", {"runner_id": old})
    client.post("/start", {"runner_id": new})

    response = client.post("/complete", {"runner_id": old, "output": 1})

    assert response.status_code == 409
    assert response.json()["detail"]["code"] == "stale_runner"
    assert new in response.json()["detail"]["message"]
    assert server.get_run(run.id).status is TaskRunStatus.EXECUTING


def _record_runner(server: WorkloadServer, run_id: str, runner_id: str) -> None:
    """Record `runner_id` as the run's current runner, as the workflow does at a restore."""
    with session_scope(server.sessions) as session:
        run = session.get(TaskRun, run_id)
        assert run is not None
        run.runner_id = runner_id
        run.status = TaskRunStatus.RESTORING


def test_workload_older_runner_cannot_take_over(
    workload_server_any_db: WorkloadServer,
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    old, current = f"{run.id}-r1", f"{run.id}-r2"
    client.post("/start", {"runner_id": old})
    waitpoint = client.post(
        "/waitpoints", {"runner_id": old, "kind": "TOKEN", "idempotency_key": "k"}
    ).json()
    _record_runner(server, run.id, current)
    events_before = len(server.events.for_run(run.id))

    attempts = {
        "start": client.post("/start", {"runner_id": old}),
        "resume": client.post("/resume", {"runner_id": old, "waitpoint_id": waitpoint["id"]}),
        "complete": client.post("/complete", {"runner_id": old, "output": "forged"}),
        "fail": client.post("/fail", {"runner_id": old, "error": {"name": "E", "message": "m"}}),
        "suspend": client.post(
            "/suspend",
            {"runner_id": old, "waitpoint_id": waitpoint["id"], "execution_snapshot_id": 1},
        ),
        "waitpoints": client.post(
            "/waitpoints", {"runner_id": old, "kind": "TOKEN", "idempotency_key": "k2"}
        ),
        "logs": client.post(
            "/logs",
            {"runner_id": old, "lines": [{"message": "x", "ts": "2026-01-01T00:00:00Z"}]},
        ),
        "heartbeat": client.post("/heartbeat", {"runner_id": old}),
    }

    for route, response in attempts.items():
        assert response.status_code == 409, f"{route}: {response.text}"
        assert response.json()["detail"]["code"] == "stale_runner", route
        assert current in response.json()["detail"]["message"], route
    stored = server.get_run(run.id)
    assert stored.runner_id == current
    assert stored.status is TaskRunStatus.RESTORING
    assert stored.output is None
    assert len(server.events.for_run(run.id)) == events_before
    assert len(server.waitpoints(run.id)) == 1
    assert server.log_messages(run.id) == []


def test_workload_current_and_newer_runner_admitted(
    workload_server_any_db: WorkloadServer,
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    _record_runner(server, run.id, f"{run.id}-r2")

    current = client.post("/start", {"runner_id": f"{run.id}-r2"})
    newer = client.post("/start", {"runner_id": f"{run.id}-r10"})
    older = client.post("/start", {"runner_id": f"{run.id}-r9"})
    foreign = client.post("/start", {"runner_id": "runner-elsewhere"})
    other_run = client.post("/start", {"runner_id": "run_other-r11"})

    assert current.status_code == 200, current.text
    assert newer.status_code == 200, newer.text
    for response in (older, foreign, other_run):
        assert response.status_code == 409, response.text
        assert response.json()["detail"]["code"] == "stale_runner"
    assert server.get_run(run.id).runner_id == f"{run.id}-r10"


def test_workload_token_runner_claim_checked(
    workload_server_any_db: WorkloadServer,
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    current = f"{run.id}-r2"
    token = server.token(run.id, run.deployment_id, runner_id=current)
    client = RunClient(server, run, token=token)

    older = client.post("/start", {"runner_id": f"{run.id}-r1"})
    newer = client.post("/start", {"runner_id": f"{run.id}-r3"})
    named = client.post("/start", {"runner_id": current})
    complete = client.post("/complete", {"runner_id": f"{run.id}-r1", "output": "forged"})

    for response in (older, newer, complete):
        assert response.status_code == 409, response.text
        assert response.json()["detail"]["code"] == "stale_runner"
        assert current in response.json()["detail"]["message"]
    assert named.status_code == 200, named.text
    stored = server.get_run(run.id)
    assert stored.runner_id == current
    assert stored.status is TaskRunStatus.EXECUTING


def test_workload_waitpoint_create_is_idempotent(
    workload_server_any_db: WorkloadServer,
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    runner_id = _runner()
    client.post("/start", {"runner_id": runner_id})
    body = {"runner_id": runner_id, "kind": "TOKEN", "timeout_ms": 60_000, "idempotency_key": "k1"}

    first = client.post("/waitpoints", body)
    second = client.post("/waitpoints", body)

    assert first.status_code == 200, first.text
    assert second.json()["id"] == first.json()["id"]
    assert first.json()["status"] == "PENDING"
    assert first.json()["timeout_at"] is not None
    assert len(server.waitpoints(run.id)) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "DURATION"},
        {"kind": "DURATION", "duration_ms": 10, "until": "2030-01-01T00:00:00Z"},
        {"kind": "DURATION", "duration_ms": 10, "timeout_ms": 10},
        {"kind": "TOKEN", "duration_ms": 10},
        {"kind": "DURATION", "until": "2030-01-01T00:00:00"},
        {"kind": "SOMETIME", "duration_ms": 10},
    ],
)
def test_workload_waitpoint_invalid_fields_rejected(
    workload_server_any_db: WorkloadServer, fields: dict[str, Any]
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    runner_id = _runner()
    client.post("/start", {"runner_id": runner_id})

    response = client.post(
        "/waitpoints", {"runner_id": runner_id, "idempotency_key": "k", **fields}
    )

    assert response.status_code == 422, response.text
    assert server.waitpoints(run.id) == []


def test_workload_suspend_on_completed_waitpoint_continues(
    workload_server_any_db: WorkloadServer,
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    runner_id = _runner()
    client.post("/start", {"runner_id": runner_id})
    waitpoint = client.post(
        "/waitpoints", {"runner_id": runner_id, "kind": "TOKEN", "idempotency_key": "k"}
    ).json()
    with session_scope(server.sessions) as session:
        complete_token(session, waitpoint["id"], {"ok": True})

    response = client.post(
        "/suspend",
        {"runner_id": runner_id, "waitpoint_id": waitpoint["id"], "execution_snapshot_id": 1},
    )

    assert response.status_code == 200, response.text
    assert response.json()["suspended"] is False
    assert response.json()["waitpoint"]["output"] == {"ok": True}
    assert server.events.for_run(run.id, "suspend_requested") == []
    assert server.get_run(run.id).status is TaskRunStatus.EXECUTING


def test_workload_suspend_and_resume_switch_runner(
    workload_server_any_db: WorkloadServer,
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    first, second = f"{run.id}-r1", f"{run.id}-r2"
    client.post("/start", {"runner_id": first})
    waitpoint = client.post(
        "/waitpoints",
        {
            "runner_id": first,
            "kind": "DURATION",
            "duration_ms": 3_600_000,
            "idempotency_key": "k",
        },
    ).json()

    suspend = client.post(
        "/suspend",
        {"runner_id": first, "waitpoint_id": waitpoint["id"], "execution_snapshot_id": 7},
    )
    suspending = server.get_run(run.id).status
    resume = client.post("/resume", {"runner_id": second, "waitpoint_id": waitpoint["id"]})

    assert suspend.json()["suspended"] is True
    assert suspending is TaskRunStatus.SUSPENDING
    assert resume.status_code == 200, resume.text
    assert resume.json() == {"run_id": run.id, "status": "EXECUTING", "runner_id": second}
    (suspended,) = server.events.for_run(run.id, "suspend_requested")
    assert suspended.runner_id == first
    assert suspended.details["suspend"].execution_snapshot_id == 7
    assert suspended.details["suspend"].resume_at is not None
    stale = client.post("/heartbeat", {"runner_id": first})
    assert stale.status_code == 409
    assert stale.json()["detail"]["code"] == "stale_runner"


def test_workload_complete_is_idempotent_then_final(
    workload_server_any_db: WorkloadServer,
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    runner_id = _runner()
    client.post("/start", {"runner_id": runner_id})

    first = client.post("/complete", {"runner_id": runner_id, "output": {"a": 1}})
    repeated = client.post("/complete", {"runner_id": runner_id, "output": {"a": 1}})
    conflicting = client.post(
        "/fail", {"runner_id": runner_id, "error": {"name": "E", "message": "late"}}
    )

    assert first.status_code == 200, first.text
    assert repeated.status_code == 200, repeated.text
    assert conflicting.status_code == 409
    assert conflicting.json()["detail"]["code"] == "run_final"
    stored = server.get_run(run.id)
    assert stored.status is TaskRunStatus.COMPLETED
    assert stored.output == {"a": 1}
    assert stored.error is None


def test_workload_logs_are_stored_in_order(workload_server_any_db: WorkloadServer) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    runner_id = _runner()
    client.post("/start", {"runner_id": runner_id})
    lines = [
        {"level": "INFO", "message": f"line {index}", "ts": "2026-01-01T00:00:00Z"}
        for index in range(3)
    ]

    response = client.post("/logs", {"runner_id": runner_id, "lines": lines})
    naive = client.post(
        "/logs",
        {"runner_id": runner_id, "lines": [{"message": "x", "ts": "2026-01-01T00:00:00"}]},
    )

    assert response.json() == {"accepted": 3}
    assert naive.status_code == 422
    assert server.log_messages(run.id) == ["line 0", "line 1", "line 2"]


def test_workload_rejects_non_strict_json(workload_server_any_db: WorkloadServer) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    runner_id = _runner()
    client.post("/start", {"runner_id": runner_id})
    runner = b'"runner_id": "' + runner_id.encode() + b'"'

    nan_output = client.post_raw("/complete", b"{" + runner + b', "output": {"x": NaN}}')
    huge_output = client.post_raw("/complete", b"{" + runner + b', "output": [1e999]}')
    surrogate_output = client.post_raw("/complete", b"{" + runner + b', "output": "\\ud800"}')
    surrogate_log = client.post_raw(
        "/logs",
        b"{" + runner + b', "lines": [{"message": "a\\udfffb", "ts": "2026-01-01T00:00:00Z"}]}',
    )
    surrogate_error = client.post_raw(
        "/fail", b"{" + runner + b', "error": {"name": "E", "message": "\\ud800"}}'
    )

    for response in (nan_output, huge_output, surrogate_output, surrogate_log, surrogate_error):
        assert response.status_code == 422, response.text
    assert "output" in str(nan_output.json())
    assert "finite" in str(nan_output.json())
    assert "surrogate" in str(surrogate_output.json())
    assert "body.lines.0.message" in str(surrogate_log.json())
    stored = server.get_run(run.id)
    assert stored.status is TaskRunStatus.EXECUTING
    assert stored.output is None
    assert server.log_messages(run.id) == []
    assert server.events.for_run(run.id)[-1].name == "runner_started"


def test_complete_token_rejects_second_and_non_json(
    workload_server_any_db: WorkloadServer,
) -> None:
    server = workload_server_any_db
    run = server.create_run("echo")
    client = RunClient(server, run)
    runner_id = _runner()
    client.post("/start", {"runner_id": runner_id})
    token = client.post(
        "/waitpoints", {"runner_id": runner_id, "kind": "TOKEN", "idempotency_key": "k"}
    ).json()

    with session_scope(server.sessions) as session, pytest.raises(WaitpointOutputError) as not_json:
        complete_token(session, token["id"], {"when": object()})
    with session_scope(server.sessions) as session:
        complete_token(session, token["id"], "first")
    with session_scope(server.sessions) as session, pytest.raises(WaitpointStateError):
        complete_token(session, token["id"], "second")

    assert "not valid JSON" in str(not_json.value)
    assert "output['when']" in str(not_json.value)
    assert client.get(f"/waitpoints/{token['id']}").json()["output"] == "first"
