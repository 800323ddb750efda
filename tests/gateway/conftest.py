"""Fixtures for gateway tests: a real gateway on uvicorn, images, and a callback receiver.

Tests marked `root` need root (namespaces, cgroups, bind mounts); tests marked `criu`
also need a working CRIU 4 (scripts/install-criu.sh installs it). Both skip with the
reason when the capability is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request, Response

from tests.machine import CRIU, IS_ROOT
from tests.servers import serve_app
from vmflow.compute.client import ComputeClient
from vmflow.compute.signing import SIGNATURE_HEADER, verify
from vmflow.gateway.drivers.cgroups import CGROUP_ROOT, CONTROLLERS
from vmflow.gateway.images import ImageStore
from vmflow.gateway.server import GatewayServer
from vmflow.gateway.settings import GatewaySettings

PROGRAMS = Path(__file__).parent / "programs"
AUTH_TOKEN = "gateway-test-token"
CALLBACK_SECRET = "gateway-test-callback-secret"
# One cgroup parent per test session, removed at its end.
CGROUP_PARENT = f"vmflow-test-{uuid.uuid4().hex[:8]}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and not IS_ROOT:
        pytest.skip("needs root for namespaces, cgroups and bind mounts")
    if item.get_closest_marker("criu") and not CRIU.works:
        pytest.skip(f"needs a working CRIU 4: {CRIU.detail}")


@pytest.fixture(scope="session", autouse=True)
def _remove_cgroup_parent() -> Any:
    yield
    for controller in CONTROLLERS:
        with contextlib.suppress(OSError):
            (CGROUP_ROOT / controller / CGROUP_PARENT).rmdir()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def gateway_settings(tmp_path: Path) -> GatewaySettings:
    return GatewaySettings(
        host="127.0.0.1",
        port=0,
        auth_token=AUTH_TOKEN,
        callback_secret=CALLBACK_SECRET,
        state_dir=tmp_path / "state",
        image_dir=tmp_path / "images",
        cgroup_parent=CGROUP_PARENT,
        pids_max=64,
        ready_timeout_s=60,
    )  # type: ignore[arg-type]


ImageBuilder = Callable[..., str]


@pytest.fixture
def build_image(gateway_settings: GatewaySettings, tmp_path: Path) -> ImageBuilder:
    """Return a function that builds an image running one of tests/gateway/programs."""

    def build(program: str, *, command: list[str] | None = None, tag: str | None = None) -> str:
        project = tmp_path / unique("project")
        shutil.copytree(PROGRAMS, project)
        module = program.removesuffix(".py")
        toml_command = json.dumps(command or ["python", program])
        (project / "vmflow.toml").write_text(
            f'[image]\nname = "{module}"\ntasks = ["{module}"]\ncommand = {toml_command}\n'
        )
        reference = tag or f"{module}:{uuid.uuid4().hex[:8]}"
        ImageStore(gateway_settings.image_dir).build(project, reference)
        return reference

    return build


@pytest_asyncio.fixture
async def gateway_server(gateway_settings: GatewaySettings) -> AsyncIterator[GatewayServer]:
    """A gateway on a free 127.0.0.1 port; every instance it still has is deleted at the end."""
    server = GatewayServer(gateway_settings)
    await server.start()
    try:
        yield server
    finally:
        await delete_all_instances(server)
        await server.stop()
    leftovers = [
        path
        for controller in CONTROLLERS
        for path in (CGROUP_ROOT / controller / CGROUP_PARENT).glob("inst_*")
    ]
    assert leftovers == [], f"cgroups left behind: {leftovers}"


async def delete_all_instances(server: GatewayServer) -> None:
    await server.gateway.delete_all_instances()


@pytest_asyncio.fixture
async def client(gateway_server: GatewayServer) -> AsyncIterator[ComputeClient]:
    async with ComputeClient(gateway_server.url, auth_token=AUTH_TOKEN, timeout_s=120) as compute:
        yield compute


@dataclass
class ReceivedCallback:
    body: bytes
    signature: str | None

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class CallbackReceiver:
    url: str = ""
    received: asyncio.Queue[ReceivedCallback] = field(default_factory=asyncio.Queue)

    async def next(self, timeout_s: float = 120) -> ReceivedCallback:
        callback = await asyncio.wait_for(self.received.get(), timeout_s)
        verify(callback.body, callback.signature, CALLBACK_SECRET)
        return callback


@pytest_asyncio.fixture
async def callbacks() -> AsyncIterator[CallbackReceiver]:
    """An HTTP server on 127.0.0.1 that queues every callback it receives."""
    receiver = CallbackReceiver()
    app = FastAPI()

    @app.post("/callback")
    async def receive(request: Request) -> Response:
        body = await request.body()
        await receiver.received.put(ReceivedCallback(body, request.headers.get(SIGNATURE_HEADER)))
        return Response(status_code=204)

    async with serve_app(app) as base_url:
        receiver.url = f"{base_url}/callback"
        yield receiver


async def read_output(compute: ComputeClient, instance_id: str) -> str:
    response = await compute.request("GET", f"/api/instances/{instance_id}/logs")
    return response.text


async def wait_for_output(
    compute: ComputeClient,
    instance_id: str,
    condition: Callable[[str], bool],
    *,
    timeout_s: float = 60,
) -> str:
    """Poll an instance's output until `condition` holds; fail with the output otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = await read_output(compute, instance_id)
        if condition(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"output of {instance_id} never matched; it is:\n{text[-2000:]}")
        await asyncio.sleep(0.05)


async def wait_for(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 60, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def probe_result(output: str) -> dict[str, Any]:
    match = re.search(r"^RESULT (.*)$", output, re.MULTILINE)
    assert match is not None, f"no RESULT line in:\n{output[-2000:]}"
    return json.loads(match.group(1))  # type: ignore[no-any-return]


def ticks(output: str) -> list[tuple[int, str]]:
    """Return (counter, checksum) of every tick line the counter program printed."""
    return [
        (int(match.group(1)), match.group(2))
        for match in re.finditer(r"^tick (\d+) checksum=(\d+) length=\d+$", output, re.MULTILINE)
    ]


def http_client(server: GatewayServer, token: str | None = AUTH_TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120)
