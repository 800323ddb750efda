"""The sandbox's limits hold: memory, pids, network and the read-only root."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vmflow.compute.client import ComputeClient
from vmflow.compute.errors import ComputeHTTPError
from vmflow.compute.models import InstanceCreateRequest, InstanceState
from vmflow.gateway.drivers.cgroups import CGROUP_ROOT
from vmflow.gateway.drivers.sandbox import DEV_NODES, Bind, SandboxDriver
from vmflow.gateway.server import GatewayServer

from .conftest import CGROUP_PARENT, ImageBuilder, probe_result, unique, wait_for, wait_for_output

pytestmark = pytest.mark.root


async def create_probe(
    client: ComputeClient, build_image: ImageBuilder, env: dict[str, str], memory_gb: float = 0.25
) -> str:
    image = build_image("probe.py")
    created = await client.instances.create(
        InstanceCreateRequest(
            name=unique("probe"), image=image, env=env, cpu=1, memory_gb=memory_gb
        )
    )
    return created.id


async def test_limits_memory_stops_allocation(
    client: ComputeClient, build_image: ImageBuilder
) -> None:
    instance_id = await create_probe(
        client, build_image, {"PROBE": "memory", "PROBE_MEGABYTES": "512"}, memory_gb=0.125
    )

    async def exited() -> bool:
        return (await client.instances.get(instance_id)).state == InstanceState.EXITED

    await wait_for(exited, what="the memory probe to be killed")
    output = (await client.request("GET", f"/api/instances/{instance_id}/logs")).text
    assert "allocating 512 MiB" in output
    assert "RESULT" not in output
    instance = await client.instances.get(instance_id)
    assert instance.exit_code == 137, output  # SIGKILL from the OOM killer
    oom_control = CGROUP_ROOT / "memory" / CGROUP_PARENT / instance_id / "memory.oom_control"
    counters = dict(line.split() for line in oom_control.read_text().splitlines())
    assert int(counters["oom_kill"]) > 0


async def test_limits_pids_stop_fork_bomb(client: ComputeClient, build_image: ImageBuilder) -> None:
    instance_id = await create_probe(client, build_image, {"PROBE": "fork", "PROBE_FORKS": "5000"})

    output = await wait_for_output(client, instance_id, lambda text: "RESULT" in text)
    result = probe_result(output)
    # The gateway's test settings allow 64 tasks: the probe itself plus at most 63 children.
    assert result["children"] < 64
    assert "errno 11" in result["error"]  # EAGAIN from fork()
    pids_current = (CGROUP_ROOT / "pids" / CGROUP_PARENT / instance_id / "pids.current").read_text()
    assert int(pids_current) <= 64
    assert (await client.instances.get(instance_id)).state == InstanceState.RUNNING


async def test_limits_no_network_to_host(client: ComputeClient, build_image: ImageBuilder) -> None:
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        instance_id = await create_probe(
            client, build_image, {"PROBE": "network", "PROBE_PORT": str(port)}
        )
        output = await wait_for_output(client, instance_id, lambda text: "RESULT" in text)
    finally:
        server.close()
        await server.wait_closed()
    result = probe_result(output)
    assert result["connected"] is False
    assert accepted == []


async def test_limits_writes_only_to_scratch(
    client: ComputeClient, build_image: ImageBuilder
) -> None:
    instance_id = await create_probe(client, build_image, {"PROBE": "write"})

    output = await wait_for_output(client, instance_id, lambda text: "RESULT" in text)
    result = probe_result(output)
    for path in [
        "/probe",
        "/app/probe",
        "/etc/probe",
        "/usr/probe",
        "/tmp/probe",
        "/dev/probe",
        "/.oldroot/probe",
        "/run/probe",
        "/run/vmflow/probe",
    ]:
        assert result[path] != "written", path
    assert result["remount"] != "written"
    assert result["/scratch/probe"] == "written"
    assert result["oldroot_exists"] is False


async def test_limits_mounts_are_read_only(
    client: ComputeClient, build_image: ImageBuilder
) -> None:
    instance_id = await create_probe(client, build_image, {"PROBE": "write"})

    output = await wait_for_output(client, instance_id, lambda text: "RESULT" in text)
    options = probe_result(output)["mount_options"]
    for mount_point in ["/", "/app", "/usr", "/etc", "/run/vmflow"]:
        assert "ro" in options[mount_point].split(","), (mount_point, options)
    assert "rw" in options["/scratch"].split(",")
    assert "rw" in options["/run/vmflow/output.log"].split(",")
    writable = {point for point, flags in options.items() if "rw" in flags.split(",")}
    assert writable == {
        "/scratch",
        "/run/vmflow/output.log",
        "/run/vmflow/exit_status",
        "/proc",
        *(f"/dev/{node}" for node in DEV_NODES),
    }


async def test_limits_failed_mount_aborts_start(
    client: ComputeClient, gateway_server: GatewayServer, build_image: ImageBuilder
) -> None:
    driver = gateway_server.gateway.driver
    assert isinstance(driver, SandboxDriver)
    missing = Bind(Path("/nonexistent-vmflow-source"), "/nonexistent")
    driver._host_binds.append(missing)
    try:
        with pytest.raises(ComputeHTTPError) as caught:
            await create_probe(client, build_image, {"PROBE": "write"})
    finally:
        driver._host_binds.remove(missing)

    assert "exited during setup" in str(caught.value)
    assert "nonexistent-vmflow-source" in str(caught.value)
    assert gateway_server.gateway.list_instances() == []
