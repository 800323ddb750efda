"""What a gateway leaves behind when it stops, and what it finishes when it starts again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from vmflow.cli.main import app as cli_app
from vmflow.compute.client import ComputeClient
from vmflow.compute.models import (
    CallbackTarget,
    InstanceCreateRequest,
    InstanceState,
    SnapshotRequest,
    SnapshotRestoreRequest,
    SnapshotState,
)
from vmflow.gateway.drivers.cgroups import CGROUP_ROOT, CONTROLLERS
from vmflow.gateway.server import GatewayServer
from vmflow.gateway.settings import GatewaySettings
from vmflow.gateway.state import InstanceRecord, SnapshotRecord

from .conftest import (
    AUTH_TOKEN,
    CallbackReceiver,
    ImageBuilder,
    unique,
    wait_for_output,
)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def instance_cgroups(settings: GatewaySettings, instance_id: str) -> list[Path]:
    return [
        CGROUP_ROOT / controller / settings.cgroup_parent / instance_id
        for controller in CONTROLLERS
        if (CGROUP_ROOT / controller / settings.cgroup_parent / instance_id).exists()
    ]


def test_serve_option_sets_delete_on_exit() -> None:
    with mock.patch("vmflow.gateway.server.serve") as serve:
        result = CliRunner().invoke(
            cli_app,
            ["gateway", "serve", "--delete-instances-on-exit"],
            env={"VMFLOW_GATEWAY_AUTH_TOKEN": "token"},
        )

    assert result.exit_code == 0, result.output
    settings = serve.call_args.args[0]
    assert settings.delete_instances_on_exit is True


def test_serve_keeps_instances_by_default() -> None:
    with mock.patch("vmflow.gateway.server.serve") as serve:
        result = CliRunner().invoke(
            cli_app,
            ["gateway", "serve"],
            env={"VMFLOW_GATEWAY_AUTH_TOKEN": "token"},
        )

    assert result.exit_code == 0, result.output
    settings = serve.call_args.args[0]
    assert settings.delete_instances_on_exit is False


@pytest.mark.root
async def test_stop_deletes_instances_when_set(
    gateway_settings: GatewaySettings, build_image: ImageBuilder
) -> None:
    settings = gateway_settings.model_copy(update={"delete_instances_on_exit": True})
    image = build_image("counter.py")
    server = GatewayServer(settings)
    await server.start()
    try:
        async with ComputeClient(server.url, auth_token=AUTH_TOKEN) as compute:
            created = await compute.instances.create(
                InstanceCreateRequest(name=unique("doomed"), image=image, cpu=1, memory_gb=0.25)
            )
            await wait_for_output(compute, created.id, lambda text: "tick 1 " in text)
        record = server.gateway.instances[created.id]
        assert record.runtime is not None
        pid = record.runtime["pid"]
    finally:
        # A plain stop, as a restart does; only the setting deletes the instances.
        await server.stop()

    assert not process_alive(pid)
    assert instance_cgroups(settings, created.id) == []
    assert not (settings.state_dir / "instances" / created.id).exists()
    stored = InstanceRecord.model_validate_json(
        (settings.state_dir / "records" / "instances" / f"{created.id}.json").read_text()
    )
    assert stored.state == InstanceState.DELETED


@pytest.mark.root
@pytest.mark.criu
async def test_stop_deleting_instances_keeps_snapshots(
    gateway_settings: GatewaySettings,
    build_image: ImageBuilder,
    callbacks: CallbackReceiver,
) -> None:
    settings = gateway_settings.model_copy(update={"delete_instances_on_exit": True})
    image = build_image("counter.py")
    server = GatewayServer(settings)
    await server.start()
    try:
        async with ComputeClient(server.url, auth_token=AUTH_TOKEN) as compute:
            created = await compute.instances.create(
                InstanceCreateRequest(name=unique("kept"), image=image, cpu=1, memory_gb=0.25)
            )
            await wait_for_output(compute, created.id, lambda text: "tick 1 " in text)
            await compute.instances.snapshot(
                created.id, SnapshotRequest(callback=CallbackTarget(url=callbacks.url))
            )
            callback = (await callbacks.next()).json()
    finally:
        await server.stop()

    assert callback["status"] == "completed", callback
    snapshot_id = callback["snapshot_id"]
    assert (settings.state_dir / "snapshots" / snapshot_id / "images").is_dir()
    second = GatewayServer(settings)
    await second.start()
    try:
        assert second.gateway.snapshots[snapshot_id].state == SnapshotState.COMPLETED
        assert second.gateway.list_instances() == []
    finally:
        await second.stop()


async def snapshot_then_rewind(
    settings: GatewaySettings, image: str, callbacks: CallbackReceiver
) -> tuple[str, str]:
    """Take a snapshot, stop the gateway, and put its records back as they were mid-snapshot.

    The records then match a gateway that crashed after CRIU's dump and before it saved
    the snapshot's result. Returns the instance id and the snapshot id.
    """
    server = GatewayServer(settings)
    await server.start()
    try:
        async with ComputeClient(server.url, auth_token=AUTH_TOKEN) as compute:
            created = await compute.instances.create(
                InstanceCreateRequest(name=unique("crashed"), image=image, cpu=1, memory_gb=0.25)
            )
            await wait_for_output(compute, created.id, lambda text: "tick 1 " in text)
            runtime = server.gateway.instances[created.id].runtime
            await compute.instances.snapshot(
                created.id,
                SnapshotRequest(callback=CallbackTarget(url=callbacks.url, metadata={"run": "r"})),
            )
            first_callback = (await callbacks.next()).json()
    finally:
        await server.stop()
    assert first_callback["status"] == "completed", first_callback
    snapshot_id: str = first_callback["snapshot_id"]

    records = settings.state_dir / "records"
    snapshot = SnapshotRecord.model_validate_json(
        (records / "snapshots" / f"{snapshot_id}.json").read_text()
    )
    snapshot.state = SnapshotState.PENDING
    snapshot.size_bytes = None
    (records / "snapshots" / f"{snapshot_id}.json").write_text(snapshot.model_dump_json())
    instance = InstanceRecord.model_validate_json(
        (records / "instances" / f"{created.id}.json").read_text()
    )
    instance.state = InstanceState.SNAPSHOTTING
    instance.runtime = runtime
    (records / "instances" / f"{created.id}.json").write_text(instance.model_dump_json())
    return created.id, snapshot_id


async def restart_and_check(
    settings: GatewaySettings,
    callbacks: CallbackReceiver,
    instance_id: str,
    snapshot_id: str,
    *,
    completed: bool,
) -> None:
    server = GatewayServer(settings)
    await server.start()
    try:
        callback = (await callbacks.next()).json()
        snapshot = server.gateway.snapshots[snapshot_id]
        instance = server.gateway.instances[instance_id]
        snapshot_dir = settings.state_dir / "snapshots" / snapshot_id

        assert callback["snapshot_id"] == snapshot_id
        assert callback["metadata"] == {"run": "r"}
        if not completed:
            assert callback["status"] == "failed", callback
            assert snapshot.state == SnapshotState.FAILED
            assert instance.state == InstanceState.EXITED
            assert not snapshot_dir.exists()
            return
        assert callback["status"] == "completed", callback
        assert snapshot.state == SnapshotState.COMPLETED
        assert snapshot.size_bytes is not None and snapshot.size_bytes > 0
        assert instance.state == InstanceState.STOPPED
        async with ComputeClient(server.url, auth_token=AUTH_TOKEN) as compute:
            restored = await compute.snapshots.restore(
                snapshot_id,
                SnapshotRestoreRequest(name=unique("recovered"), cpu=1, memory_gb=0.25),
            )
            assert restored is not None
            await wait_for_output(compute, restored.id, lambda text: "generation=1" in text)
    finally:
        await server.gateway.delete_all_instances()
        await server.stop()


@pytest.mark.root
@pytest.mark.criu
async def test_restart_finishes_recorded_snapshot(
    gateway_settings: GatewaySettings, build_image: ImageBuilder, callbacks: CallbackReceiver
) -> None:
    image = build_image("counter.py")
    instance_id, snapshot_id = await snapshot_then_rewind(gateway_settings, image, callbacks)

    await restart_and_check(gateway_settings, callbacks, instance_id, snapshot_id, completed=True)


@pytest.mark.root
@pytest.mark.criu
async def test_restart_copies_files_after_dump(
    gateway_settings: GatewaySettings, build_image: ImageBuilder, callbacks: CallbackReceiver
) -> None:
    image = build_image("counter.py")
    instance_id, snapshot_id = await snapshot_then_rewind(gateway_settings, image, callbacks)
    # The crash came right after CRIU's dump, before the files were copied.
    snapshot_dir = gateway_settings.state_dir / "snapshots" / snapshot_id
    shutil.rmtree(snapshot_dir / "files")
    (snapshot_dir / "sandbox.json").unlink()
    (snapshot_dir / "complete.json").unlink()

    await restart_and_check(gateway_settings, callbacks, instance_id, snapshot_id, completed=True)


@pytest.mark.root
@pytest.mark.criu
async def test_restart_fails_unfinished_dump(
    gateway_settings: GatewaySettings, build_image: ImageBuilder, callbacks: CallbackReceiver
) -> None:
    image = build_image("counter.py")
    instance_id, snapshot_id = await snapshot_then_rewind(gateway_settings, image, callbacks)
    # The crash came while CRIU was still dumping.
    snapshot_dir = gateway_settings.state_dir / "snapshots" / snapshot_id
    shutil.rmtree(snapshot_dir / "files")
    (snapshot_dir / "sandbox.json").unlink()
    (snapshot_dir / "complete.json").unlink()
    (snapshot_dir / "dump.log").write_text("(00.010000) Dumping path for -1 fd via self\n")

    await restart_and_check(gateway_settings, callbacks, instance_id, snapshot_id, completed=False)
