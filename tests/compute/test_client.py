"""ComputeClient: error translation, empty answers, headers and pooling.

The first half drives the client through `httpx.MockTransport`; the second
half runs it against a real HTTP server (FastAPI under uvicorn, on a free
port of 127.0.0.1) so timeouts, refused connections and connection reuse
are the real thing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.servers import serve_app_in_thread
from vmflow.compute import (
    ComputeClient,
    ComputeConnectionError,
    ComputeError,
    ComputeHTTPError,
    ComputeResponseError,
    ComputeTimeoutError,
)
from vmflow.compute.models import (
    InstanceCreateRequest,
    InstanceState,
    SnapshotRequest,
    SnapshotRestoreRequest,
    TemplateCreateRequest,
)
from vmflow.config import load_settings

BASE_URL = "http://gateway.test:8000"

INSTANCE = {
    "id": "inst_1",
    "name": "run-1",
    "image": "team/app:1",
    "state": "running",
    "cpu": 1,
    "memory_gb": 0.5,
}


def _span_trace_id(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


# ---------------------------------------------------------------------------
# httpx.MockTransport


class Recorder:
    """A MockTransport handler that records requests and answers from a queue of responses."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.responses.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def mock_client(recorder: Recorder, **kwargs: Any) -> ComputeClient:
    return ComputeClient(BASE_URL, transport=httpx.MockTransport(recorder), **kwargs)


async def test_create_instance_sends_json_and_parses_the_answer() -> None:
    recorder = Recorder(httpx.Response(201, json={"id": "inst_1", "_timing": {"total_ms": 12}}))
    async with mock_client(recorder) as client:
        created = await client.instances.create(
            InstanceCreateRequest(name="run-1", image="team/app:1", cpu=1, memory_gb=0.5)
        )

    assert created.id == "inst_1"
    assert created.timing == {"total_ms": 12}
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/api/instances"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    body = json.loads(request.content)
    assert body == {"name": "run-1", "image": "team/app:1", "env": {}, "cpu": 1, "memory_gb": 0.5}
    assert "metadata" not in body  # None fields are left out


async def test_get_instance_keeps_unknown_fields() -> None:
    recorder = Recorder(httpx.Response(200, json={**INSTANCE, "driver": "firecracker"}))
    async with mock_client(recorder) as client:
        instance = await client.instances.get("inst_1")

    assert instance.state is InstanceState.RUNNING
    assert instance.model_extra == {"driver": "firecracker"}
    assert recorder.requests[0].content == b""
    assert "content-type" not in recorder.requests[0].headers


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500, 502, 503])
async def test_error_status_raises_http_error_with_status_body_and_url(status: int) -> None:
    body = json.dumps({"error": f"boom {status}"})
    recorder = Recorder(httpx.Response(status, text=body))
    async with mock_client(recorder) as client:
        with pytest.raises(ComputeHTTPError) as caught:
            await client.instances.get("inst_9")

    error = caught.value
    assert error.status == status
    assert error.body == body
    assert error.url == f"{BASE_URL}/api/instances/inst_9"
    assert str(status) in str(error) and f"boom {status}" in str(error)
    assert error.retryable is (status >= 500)


@pytest.mark.parametrize(("status", "retryable"), [(408, True), (425, True), (429, True)])
async def test_throttling_statuses_are_retryable(status: int, retryable: bool) -> None:
    async with mock_client(Recorder(httpx.Response(status))) as client:
        with pytest.raises(ComputeHTTPError) as caught:
            await client.instances.delete("inst_1")
    assert caught.value.retryable is retryable
    assert "<empty body>" in str(caught.value)


async def test_long_error_body_is_truncated() -> None:
    async with mock_client(Recorder(httpx.Response(500, text="x" * 10_000))) as client:
        with pytest.raises(ComputeHTTPError) as caught:
            await client.instances.delete("inst_1")
    assert caught.value.body == "x" * 4096


async def test_invalid_success_body_raises_response_error() -> None:
    recorder = Recorder(httpx.Response(200, json={"id": "inst_1"}))  # no name/image/state
    async with mock_client(recorder) as client:
        with pytest.raises(ComputeResponseError) as caught:
            await client.instances.get("inst_1")

    assert caught.value.status == 200
    assert caught.value.url == f"{BASE_URL}/api/instances/inst_1"
    assert "Instance" in str(caught.value)
    assert caught.value.retryable is False


async def test_non_json_success_body_raises_response_error() -> None:
    async with mock_client(Recorder(httpx.Response(200, text="<html>"))) as client:
        with pytest.raises(ComputeResponseError):
            await client.health()


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (httpx.ConnectError("refused"), ComputeConnectionError),
        (httpx.RemoteProtocolError("peer closed"), ComputeConnectionError),
        (httpx.ReadError("reset"), ComputeConnectionError),
        (httpx.ConnectTimeout("slow connect"), ComputeTimeoutError),
        (httpx.ReadTimeout("slow read"), ComputeTimeoutError),
        (httpx.PoolTimeout("pool"), ComputeTimeoutError),
    ],
)
async def test_transport_errors_are_translated(
    raised: Exception, expected: type[ComputeError]
) -> None:
    async with mock_client(Recorder(raised)) as client:
        with pytest.raises(expected) as caught:
            await client.instances.get("inst_1")

    assert caught.value.url == f"{BASE_URL}/api/instances/inst_1"
    assert caught.value.status is None
    assert caught.value.retryable is True
    assert caught.value.__cause__ is raised


@pytest.mark.parametrize("status", [202, 204])
async def test_template_build_without_body_returns_none(status: int) -> None:
    recorder = Recorder(httpx.Response(status))
    async with mock_client(recorder) as client:
        result = await client.templates.create(
            TemplateCreateRequest(image="team/app:1", cpu=1, memory_gb=1, background=True)
        )

    assert result is None
    assert json.loads(recorder.requests[0].content)["background"] is True


async def test_template_build_in_foreground_returns_the_result() -> None:
    recorder = Recorder(httpx.Response(200, json={"template_id": "tpl_1", "status": "ready"}))
    async with mock_client(recorder) as client:
        result = await client.templates.create(
            TemplateCreateRequest(image="team/app:1", cpu=1, memory_gb=1)
        )
    assert result is not None and result.template_id == "tpl_1"


@pytest.mark.parametrize(
    "response", [httpx.Response(202), httpx.Response(204), httpx.Response(200, content=b"")]
)
async def test_restore_without_body_returns_none(response: httpx.Response) -> None:
    async with mock_client(Recorder(response)) as client:
        result = await client.snapshots.restore(
            "snap_1", SnapshotRestoreRequest(name="run-1-r1", cpu=1, memory_gb=1)
        )
    assert result is None


async def test_snapshot_request_accepts_202_without_body() -> None:
    recorder = Recorder(httpx.Response(202))
    async with mock_client(recorder) as client:
        await client.instances.snapshot(
            "inst_1",
            SnapshotRequest(callback={"url": "http://127.0.0.1:8080/cb", "metadata": {"a": "b"}}),
        )

    request = recorder.requests[0]
    assert str(request.url) == f"{BASE_URL}/api/instances/inst_1/snapshot"
    assert json.loads(request.content) == {
        "callback": {"url": "http://127.0.0.1:8080/cb", "metadata": {"a": "b"}}
    }


async def test_auth_header_is_sent_when_a_token_is_set() -> None:
    recorder = Recorder(httpx.Response(204), httpx.Response(204))
    async with mock_client(recorder, auth_token="tok-123") as client:
        await client.instances.delete("a")
    async with mock_client(recorder) as client:
        await client.instances.delete("b")

    assert recorder.requests[0].headers["authorization"] == "Bearer tok-123"
    assert "authorization" not in recorder.requests[1].headers


async def test_traceparent_is_sent_only_inside_a_span(
    span_exporter: InMemorySpanExporter,
) -> None:
    recorder = Recorder(httpx.Response(204), httpx.Response(204))
    tracer = trace.get_tracer(__name__)
    async with mock_client(recorder) as client:
        with tracer.start_as_current_span("dispatch") as span:
            await client.instances.delete("a")
        await client.instances.delete("b")

    traced, untraced = recorder.requests
    version, trace_id, span_id, flags = traced.headers["traceparent"].split("-")
    assert version == "00"
    assert int(flags, 16) & 0x01  # sampled
    assert trace_id == _span_trace_id(span)
    assert span_id == format(span.get_span_context().span_id, "016x")
    assert "traceparent" not in untraced.headers
    assert [s.name for s in span_exporter.get_finished_spans()] == ["dispatch"]


def test_from_settings_uses_url_token_and_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPUTE_GATEWAY_URL", "http://127.0.0.1:8090")
    monkeypatch.setenv("COMPUTE_GATEWAY_AUTH_TOKEN", "tok")
    monkeypatch.setenv("COMPUTE_GATEWAY_TIMEOUT_MS", "2500")
    client = ComputeClient.from_settings(load_settings())

    http = client._http
    assert str(http.base_url).rstrip("/") == "http://127.0.0.1:8090"
    assert http.headers["authorization"] == "Bearer tok"
    assert http.timeout.read == 2.5


def test_from_settings_without_gateway_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COMPUTE_GATEWAY_URL", raising=False)
    with pytest.raises(ValueError, match="COMPUTE_GATEWAY_URL"):
        ComputeClient.from_settings(load_settings())


async def test_error_url_keeps_a_base_path_prefix() -> None:
    recorder = Recorder(httpx.Response(404))
    async with ComputeClient(
        "http://gateway.test:8000/compute/", transport=httpx.MockTransport(recorder)
    ) as client:
        with pytest.raises(ComputeHTTPError) as caught:
            await client.instances.get("x")

    assert str(recorder.requests[0].url) == "http://gateway.test:8000/compute/api/instances/x"
    assert caught.value.url == str(recorder.requests[0].url)


# ---------------------------------------------------------------------------
# A real gateway on 127.0.0.1


@dataclass
class Seen:
    """What the fake gateway received: one entry per request."""

    client_ports: list[int] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def clear(self) -> None:
        self.client_ports.clear()
        self.headers.clear()


def build_gateway(seen: Seen) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def record(request: Request, call_next: Callable[[Request], Any]) -> Response:
        assert request.client is not None
        seen.client_ports.append(request.client.port)
        seen.headers.append({k.lower(): v for k, v in request.headers.items()})
        response: Response = await call_next(request)
        return response

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/instances/{instance_id}")
    async def get_instance(instance_id: str) -> Response:
        if instance_id == "slow":
            await asyncio.sleep(2)
        if instance_id == "missing":
            return JSONResponse({"error": "instance missing not found"}, status_code=404)
        if instance_id == "broken":
            return PlainTextResponse("driver crashed: qemu exited 1", status_code=500)
        return JSONResponse({**INSTANCE, "id": instance_id})

    @app.post("/api/templates")
    async def create_template() -> Response:
        return Response(status_code=202)

    @app.post("/api/snapshots/{snapshot_id}/restore")
    async def restore(snapshot_id: str) -> Response:
        return Response(status_code=202)

    return app


@dataclass
class Gateway:
    url: str
    seen: Seen


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    """A FastAPI gateway served by uvicorn in a thread, on a free port of 127.0.0.1."""
    seen = Seen()
    with serve_app_in_thread(
        build_gateway(seen), start_timeout_s=5, timeout_graceful_shutdown=1
    ) as url:
        yield Gateway(url=url, seen=seen)


@pytest.fixture
def real_gateway(gateway: Gateway) -> Gateway:
    gateway.seen.clear()
    return gateway


async def test_real_timeout_raises_timeout_error(real_gateway: Gateway) -> None:
    async with ComputeClient(real_gateway.url, timeout_s=0.2) as client:
        with pytest.raises(ComputeTimeoutError) as caught:
            await client.instances.get("slow")

    assert caught.value.url == f"{real_gateway.url}/api/instances/slow"
    assert "0.2 s" in str(caught.value)
    assert "COMPUTE_GATEWAY_TIMEOUT_MS" in str(caught.value)


async def test_real_connection_refused_raises_connection_error(closed_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{closed_tcp_port}"
    async with ComputeClient(url, timeout_s=5) as client:
        with pytest.raises(ComputeConnectionError) as caught:
            await client.health()

    assert caught.value.url == f"{url}/healthz"
    assert "COMPUTE_GATEWAY_URL" in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


async def test_real_4xx_body_is_in_the_error(real_gateway: Gateway) -> None:
    async with ComputeClient(real_gateway.url) as client:
        with pytest.raises(ComputeHTTPError) as caught:
            await client.instances.get("missing")

    assert caught.value.status == 404
    assert json.loads(caught.value.body or "") == {"error": "instance missing not found"}
    assert caught.value.url == f"{real_gateway.url}/api/instances/missing"
    assert caught.value.retryable is False


async def test_real_5xx_body_is_in_the_error(real_gateway: Gateway) -> None:
    async with ComputeClient(real_gateway.url) as client:
        with pytest.raises(ComputeHTTPError) as caught:
            await client.instances.get("broken")

    assert caught.value.status == 500
    assert caught.value.body == "driver crashed: qemu exited 1"
    assert caught.value.url == f"{real_gateway.url}/api/instances/broken"
    assert "driver crashed" in str(caught.value)
    assert caught.value.retryable is True


async def test_real_202_without_body_returns_none(real_gateway: Gateway) -> None:
    async with ComputeClient(real_gateway.url) as client:
        built = await client.templates.create(
            TemplateCreateRequest(image="team/app:1", cpu=1, memory_gb=1, background=True)
        )
        restored = await client.snapshots.restore(
            "snap_1", SnapshotRestoreRequest(name="run-1-r1", cpu=1, memory_gb=1)
        )

    assert built is None
    assert restored is None


async def test_real_server_receives_auth_and_traceparent(
    real_gateway: Gateway, span_exporter: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer(__name__)
    async with ComputeClient(real_gateway.url, auth_token="gw-token") as client:
        with tracer.start_as_current_span("provision") as span:
            instance = await client.instances.get("inst_7")

    assert instance.id == "inst_7"
    (headers,) = real_gateway.seen.headers
    assert headers["authorization"] == "Bearer gw-token"
    assert headers["traceparent"].split("-")[1] == _span_trace_id(span)


async def test_real_requests_reuse_one_pooled_connection(real_gateway: Gateway) -> None:
    async with ComputeClient(real_gateway.url) as client:
        for _ in range(5):
            await client.health()
        await client.instances.get("inst_1")
        with pytest.raises(ComputeHTTPError):
            await client.instances.get("missing")  # an error answer keeps the connection
        await client.health()

    assert len(real_gateway.seen.client_ports) == 8
    assert len(set(real_gateway.seen.client_ports)) == 1

    # A second client is a second connection set: the count above can tell them apart.
    async with ComputeClient(real_gateway.url) as other:
        await other.health()
    assert len(set(real_gateway.seen.client_ports)) == 2
