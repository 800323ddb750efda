"""The channel server on a real Unix socket, proxying to a real upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fastapi import FastAPI, Request

from tests.servers import serve_app
from vmflow.gateway.channel import ChannelServer


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.path))


def channel_request(path: Path, method: str, target: str, body: Any = None) -> tuple[int, Any]:
    connection = UnixConnection(path)
    try:
        payload = None if body is None else json.dumps(body).encode()
        connection.request(
            method, target, body=payload, headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else None)
    finally:
        connection.close()


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in workload API that records each request's path, auth header and body."""
    seen: list[dict[str, Any]] = []
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def record(path: str, request: Request) -> dict[str, Any]:
        seen.append(
            {
                "path": f"/{path}",
                "query": request.url.query,
                "authorization": request.headers.get("authorization"),
                "body": (await request.body()).decode(),
            }
        )
        return {"ok": True}

    async with serve_app(app) as url:
        yield url, seen


@pytest_asyncio.fixture
async def channel(
    tmp_path: Path, upstream: tuple[str, list[dict[str, Any]]]
) -> AsyncIterator[ChannelServer]:
    ready = asyncio.Event()
    server = ChannelServer(
        tmp_path / "io" / "channel.sock",
        identity=lambda: {"id": "inst_1", "generation": 2},
        on_ready=ready.set,
        workload_url=upstream[0],
        workload_token="run-token",
    )
    server.ready_event = ready  # type: ignore[attr-defined]
    await server.start()
    yield server
    await server.close()


async def test_channel_returns_identity(channel: ChannelServer) -> None:
    status, body = await asyncio.to_thread(
        channel_request, channel.socket_path, "GET", "/_gateway/instance"
    )
    assert status == 200
    assert body == {"id": "inst_1", "generation": 2}


async def test_channel_ready_calls_hook(channel: ChannelServer) -> None:
    status, body = await asyncio.to_thread(
        channel_request, channel.socket_path, "POST", "/_gateway/ready"
    )
    assert status == 204
    assert body is None
    assert channel.ready_event.is_set()  # type: ignore[attr-defined]


async def test_channel_proxy_adds_workload_token(
    channel: ChannelServer, upstream: tuple[str, list[dict[str, Any]]]
) -> None:
    status, body = await asyncio.to_thread(
        channel_request,
        channel.socket_path,
        "POST",
        "/api/v1/workload/runs/r1/events?x=1",
        {"a": 1},
    )
    assert status == 200
    assert body == {"ok": True}
    assert upstream[1] == [
        {
            "path": "/api/v1/workload/runs/r1/events",
            "query": "x=1",
            "authorization": "Bearer run-token",
            "body": '{"a": 1}',
        }
    ]

    channel.set_workload(upstream[0], "new-token")
    await asyncio.to_thread(channel_request, channel.socket_path, "GET", "/api/v1/workload/ping")
    assert upstream[1][-1]["authorization"] == "Bearer new-token"


async def test_channel_unknown_gateway_route_is_404(channel: ChannelServer) -> None:
    status, body = await asyncio.to_thread(
        channel_request, channel.socket_path, "GET", "/_gateway/other"
    )
    assert status == 404
    assert "/_gateway/instance" in body["detail"]


async def test_channel_proxy_without_upstream_is_503(tmp_path: Path) -> None:
    server = ChannelServer(tmp_path / "channel.sock", identity=lambda: {})
    await server.start()
    try:
        status, body = await asyncio.to_thread(
            channel_request, server.socket_path, "GET", "/api/v1/workload/ping"
        )
    finally:
        await server.close()
    assert status == 503
    assert "VMFLOW_WORKLOAD_URL" in body["detail"]


async def test_channel_pause_refuses_and_waits_for_open_connection(channel: ChannelServer) -> None:
    # A client that has its response but has not closed its end yet.
    open_client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await asyncio.to_thread(open_client.connect, str(channel.socket_path))
    open_client.sendall(b"GET /_gateway/instance HTTP/1.1\r\nHost: x\r\n\r\n")
    response = await asyncio.to_thread(open_client.recv, 65536)
    assert response.startswith(b"HTTP/1.1 200")

    pause = asyncio.create_task(channel.pause(timeout_s=30))
    await asyncio.sleep(0)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.to_thread(channel_request, channel.socket_path, "GET", "/_gateway/instance")
    assert not pause.done()

    open_client.close()
    await asyncio.wait_for(pause, 10)
    assert not channel.accepting

    await channel.resume()
    status, _ = await asyncio.to_thread(
        channel_request, channel.socket_path, "GET", "/_gateway/instance"
    )
    assert status == 200
