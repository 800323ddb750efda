"""The gateway's HTTP API: auth, bad input, idempotency and state across a restart."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from vmflow.compute.client import ComputeClient
from vmflow.compute.errors import ComputeHTTPError
from vmflow.compute.models import (
    CallbackTarget,
    InstanceCreateRequest,
    InstanceState,
    SnapshotRequest,
    SnapshotRestoreRequest,
)
from vmflow.gateway.drivers.cgroups import CGROUP_ROOT
from vmflow.gateway.server import GatewayServer
from vmflow.gateway.settings import GatewaySettings

from .conftest import (
    AUTH_TOKEN,
    CGROUP_PARENT,
    CallbackReceiver,
    ImageBuilder,
    delete_all_instances,
    http_client,
    read_output,
    ticks,
    unique,
    wait_for,
    wait_for_output,
)


def assert_nothing_created(server: GatewayServer, settings: GatewaySettings) -> None:
    assert server.gateway.instances == {}
    instances_dir = settings.state_dir / "instances"
    assert not instances_dir.exists() or list(instances_dir.iterdir()) == []
    assert list((CGROUP_ROOT / "memory" / CGROUP_PARENT).glob("inst_*")) == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
        ("POST", "/api/instances"),
        ("GET", "/api/instances/inst_x"),
        ("DELETE", "/api/instances/inst_x"),
        ("POST", "/api/instances/inst_x/snapshot"),
        ("POST", "/api/snapshots/snap_x/restore"),
        ("POST", "/api/templates"),
    ],
)
@pytest.mark.parametrize("token", [None, "wrong-token"])
async def test_api_rejects_missing_or_wrong_token(
    gateway_server: GatewayServer, method: str, path: str, token: str | None
) -> None:
    async with http_client(gateway_server, token) as http:
        response = await http.request(method, path, json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert ("missing" if token is None else "invalid") in response.json()["detail"]


async def test_api_health_reports_drivers(client: ComputeClient) -> None:
    health = await client.health()
    assert health.drivers[0].name == "sandbox"
    if os.geteuid() == 0:
        assert health.drivers[0].available is True


async def test_api_openapi_lists_routes(gateway_server: GatewayServer) -> None:
    async with http_client(gateway_server) as http:
        document = (await http.get("/openapi.json")).json()
    for path in ["/api/instances", "/api/templates", "/api/snapshots/{snapshot_id}/restore"]:
        assert path in document["paths"]


async def test_api_rejects_unknown_image(
    client: ComputeClient, gateway_server: GatewayServer, gateway_settings: GatewaySettings
) -> None:
    with pytest.raises(ComputeHTTPError) as caught:
        await client.instances.create(
            InstanceCreateRequest(name=unique("x"), image="missing/app:1.0", cpu=1, memory_gb=0.25)
        )
    assert caught.value.status == 404
    assert "missing/app:1.0" in str(caught.value)
    assert "vmflow image build" in str(caught.value)
    assert_nothing_created(gateway_server, gateway_settings)


@pytest.mark.parametrize(
    ("cpu", "memory_gb", "named"),
    [(0, 0.25, "cpu"), (65, 0.25, "cpu"), (1000.0, 0.25, "cpu"), (1, 0, "memory_gb"),
     (1, 0.01, "memory_gb"), (1, 200, "memory_gb"), (1, 1000, "memory_gb")],
)  # fmt: skip
async def test_api_rejects_limits_out_of_range(
    gateway_server: GatewayServer,
    gateway_settings: GatewaySettings,
    build_image: ImageBuilder,
    cpu: float,
    memory_gb: float,
    named: str,
) -> None:
    image = build_image("counter.py")
    body = {"name": unique("x"), "image": image, "cpu": cpu, "memory_gb": memory_gb}
    async with http_client(gateway_server) as http:
        response = await http.post("/api/instances", json=body)
    assert response.status_code == 422
    assert named in response.text
    assert_nothing_created(gateway_server, gateway_settings)


async def test_api_rejects_body_over_limit(
    gateway_server: GatewayServer, gateway_settings: GatewaySettings
) -> None:
    body = b'{"name": "big", "image": "a:1", "cpu": 1, "memory_gb": 1, "env": {"A": "'
    body += b"x" * (gateway_settings.max_body_bytes + 1) + b'"}}'
    async with http_client(gateway_server) as http:
        response = await http.post(
            "/api/instances", content=body, headers={"Content-Type": "application/json"}
        )

        async def chunks():  # type: ignore[no-untyped-def]
            for start in range(0, len(body), 65536):
                yield body[start : start + 65536]

        streamed = await http.post(
            "/api/instances", content=chunks(), headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 413
    assert streamed.status_code == 413
    assert str(gateway_settings.max_body_bytes) in response.json()["detail"]
    assert_nothing_created(gateway_server, gateway_settings)


async def test_api_unknown_ids_return_404(client: ComputeClient) -> None:
    callback = CallbackTarget(url="http://127.0.0.1:9/callback")
    calls = [
        client.instances.snapshot("inst_unknown", SnapshotRequest(callback=callback)),
        client.snapshots.restore(
            "snap_unknown", SnapshotRestoreRequest(name=unique("r"), cpu=1, memory_gb=0.25)
        ),
        client.instances.get("inst_unknown"),
        client.instances.delete("inst_unknown"),
        client.snapshots.get("snap_unknown"),
    ]
    for call in calls:
        with pytest.raises(ComputeHTTPError) as caught:
            await call
        assert caught.value.status == 404
        assert "unknown" in str(caught.value)


@pytest.mark.root
async def test_api_create_is_idempotent_by_name(
    client: ComputeClient, gateway_server: GatewayServer, build_image: ImageBuilder
) -> None:
    image = build_image("counter.py")
    request = InstanceCreateRequest(name=unique("same"), image=image, cpu=1, memory_gb=0.25)

    first = await client.instances.create(request)
    second = await client.instances.create(request)
    concurrent_request = request.model_copy(update={"name": unique("concurrent")})
    concurrent = await asyncio.gather(
        client.instances.create(concurrent_request), client.instances.create(concurrent_request)
    )
    assert second.id == first.id
    assert concurrent[0].id == concurrent[1].id
    live = [r for r in gateway_server.gateway.instances.values() if r.name == request.name]
    assert len(live) == 1

    other_image = build_image("probe.py")
    with pytest.raises(ComputeHTTPError) as caught:
        await client.instances.create(request.model_copy(update={"image": other_image}))
    assert caught.value.status == 409
    assert request.name in str(caught.value)


@pytest.mark.root
async def test_api_snapshot_of_stopped_instance_conflicts(
    client: ComputeClient, build_image: ImageBuilder
) -> None:
    image = build_image("probe.py", command=["python", "-c", "print('done')"])
    created = await client.instances.create(
        InstanceCreateRequest(name=unique("short"), image=image, cpu=1, memory_gb=0.25)
    )

    async def exited() -> bool:
        return (await client.instances.get(created.id)).state == InstanceState.EXITED

    await wait_for(exited, what="the instance to exit")
    assert (await client.instances.get(created.id)).exit_code == 0
    with pytest.raises(ComputeHTTPError) as caught:
        await client.instances.snapshot(
            created.id,
            SnapshotRequest(callback=CallbackTarget(url="http://127.0.0.1:9/callback")),
        )
    assert caught.value.status == 409
    assert "exited" in str(caught.value)

    await client.instances.delete(created.id)
    with pytest.raises(ComputeHTTPError) as after_delete:
        await client.instances.get(created.id)
    assert after_delete.value.status == 404


@pytest.mark.root
async def test_api_failed_boot_leaves_nothing(
    client: ComputeClient,
    gateway_server: GatewayServer,
    gateway_settings: GatewaySettings,
    build_image: ImageBuilder,
) -> None:
    image = build_image("probe.py")
    store_app = next((gateway_settings.image_dir / "digests").iterdir()) / "app"
    # A missing /app breaks the sandbox's bind mount, so its setup fails.
    store_app.rename(store_app.with_name("moved"))
    try:
        with pytest.raises(ComputeHTTPError) as caught:
            await client.instances.create(
                InstanceCreateRequest(name=unique("broken"), image=image, cpu=1, memory_gb=0.25)
            )
    finally:
        store_app.with_name("moved").rename(store_app)
    assert caught.value.status == 500
    assert "setup" in str(caught.value)
    assert_nothing_created(gateway_server, gateway_settings)


@pytest.mark.root
async def test_api_state_survives_restart(
    gateway_settings: GatewaySettings, build_image: ImageBuilder
) -> None:
    image = build_image("counter.py")
    first = GatewayServer(gateway_settings)
    await first.start()
    try:
        async with ComputeClient(first.url, auth_token=AUTH_TOKEN) as compute:
            created = await compute.instances.create(
                InstanceCreateRequest(name=unique("survivor"), image=image, cpu=1, memory_gb=0.25)
            )
            await wait_for_output(compute, created.id, lambda text: "identity generation=0" in text)
    finally:
        await first.stop()

    second = GatewayServer(gateway_settings)
    await second.start()
    try:
        async with ComputeClient(second.url, auth_token=AUTH_TOKEN) as compute:
            instance = await compute.instances.get(created.id)
            assert instance.state == InstanceState.RUNNING
            before = await read_output(compute, created.id)
            identities = before.count("identity generation=0")
            # The new gateway serves the channel again: the process reads its identity.
            await wait_for_output(
                compute,
                created.id,
                lambda text: text.count("identity generation=0") > identities,
            )

            pid = second.gateway.instances[created.id].runtime["pid"]  # type: ignore[index]
            os.kill(pid, signal.SIGKILL)

            async def exited() -> bool:
                return (await compute.instances.get(created.id)).state == InstanceState.EXITED

            await wait_for(exited, what="the killed instance to be reported as exited")
            assert ticks(await read_output(compute, created.id))
    finally:
        await delete_all_instances(second)
        await second.stop()
    assert not (gateway_settings.state_dir / "instances" / created.id).exists()


@pytest.mark.root
@pytest.mark.criu
async def test_api_snapshot_returns_202_then_calls_back(
    gateway_server: GatewayServer, build_image: ImageBuilder, callbacks: CallbackReceiver
) -> None:
    image = build_image("counter.py")
    async with http_client(gateway_server) as http:
        created = await http.post(
            "/api/instances",
            json={"name": unique("accepted"), "image": image, "cpu": 1, "memory_gb": 0.25},
        )
        instance_id = created.json()["id"]
        response = await http.post(
            f"/api/instances/{instance_id}/snapshot", json={"callback": {"url": callbacks.url}}
        )
        assert response.status_code == 202
        snapshot_id = response.json()["snapshot_id"]
        assert snapshot_id.startswith("snap_")

        # A second request conflicts: the instance is snapshotting, or stopped once it is done.
        again = await http.post(
            f"/api/instances/{instance_id}/snapshot", json={"callback": {"url": callbacks.url}}
        )
        callback = (await callbacks.next()).json()
    assert again.status_code == 409
    assert f"Cannot snapshot instance '{instance_id}'" in again.json()["detail"]
    assert callback["snapshot_id"] == snapshot_id
    assert callback["status"] == "completed"


def test_api_requires_token_setting(tmp_path: Path) -> None:
    from vmflow.config import ConfigError
    from vmflow.gateway.app import create_app

    settings = GatewaySettings(state_dir=tmp_path, image_dir=tmp_path, callback_secret="s")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="VMFLOW_GATEWAY_AUTH_TOKEN"):
        create_app(settings)
