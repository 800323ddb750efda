"""The gateway never follows a symlink planted among an instance's io files on the host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmflow.compute.client import ComputeClient
from vmflow.compute.models import (
    CallbackTarget,
    InstanceCreateRequest,
    SnapshotRequest,
)
from vmflow.gateway.hostfiles import NotRegularFileError, copy_regular, read_regular
from vmflow.gateway.settings import GatewaySettings

from .conftest import (
    CallbackReceiver,
    ImageBuilder,
    probe_result,
    read_output,
    unique,
    wait_for_output,
)

SECRET = "host-secret-4f1c9e"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "host-secret.txt"
    path.write_text(SECRET + "\n")
    return path


def test_read_regular_rejects_symlink(tmp_path: Path, secret_file: Path) -> None:
    link = tmp_path / "output.log"
    link.symlink_to(secret_file)

    with pytest.raises(NotRegularFileError):
        read_regular(link)


def test_read_regular_rejects_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "output.log"
    os.mkfifo(fifo)

    with pytest.raises(NotRegularFileError):
        read_regular(fifo)


def test_read_regular_returns_tail(tmp_path: Path) -> None:
    path = tmp_path / "output.log"
    path.write_bytes(b"0123456789")

    assert read_regular(path) == b"0123456789"
    assert read_regular(path, tail_bytes=3) == b"789"


def test_copy_regular_rejects_symlink(tmp_path: Path, secret_file: Path) -> None:
    link = tmp_path / "output.log"
    link.symlink_to(secret_file)
    destination = tmp_path / "copy.log"

    with pytest.raises(NotRegularFileError):
        copy_regular(link, destination)
    assert not destination.exists()


def test_copy_regular_replaces_destination_symlink(tmp_path: Path, secret_file: Path) -> None:
    source = tmp_path / "output.log"
    source.write_text("task output\n")
    destination = tmp_path / "copy.log"
    destination.symlink_to(secret_file)

    copy_regular(source, destination)

    assert not destination.is_symlink()
    assert destination.read_text() == "task output\n"
    assert secret_file.read_text() == SECRET + "\n"


async def start_io_probe(client: ComputeClient, build_image: ImageBuilder, target: Path) -> str:
    image = build_image("probe.py")
    created = await client.instances.create(
        InstanceCreateRequest(
            name=unique("io-probe"),
            image=image,
            env={"PROBE": "io", "PROBE_TARGET": str(target)},
            cpu=1,
            memory_gb=0.25,
        )
    )
    return created.id


@pytest.mark.root
async def test_sandbox_cannot_replace_io_files(
    client: ComputeClient, build_image: ImageBuilder, secret_file: Path
) -> None:
    instance_id = await start_io_probe(client, build_image, secret_file)

    output = await wait_for_output(
        client, instance_id, lambda text: "RESULT" in text or SECRET in text
    )

    assert SECRET not in output
    result = probe_result(output)
    assert result["output.log"] != "replaced"
    assert result["exit_status"] != "replaced"
    assert result["planted"] != "replaced"


@pytest.mark.root
async def test_logs_do_not_follow_host_symlink(
    client: ComputeClient,
    build_image: ImageBuilder,
    gateway_settings: GatewaySettings,
    secret_file: Path,
) -> None:
    instance_id = await start_io_probe(client, build_image, secret_file)
    await wait_for_output(client, instance_id, lambda text: "RESULT" in text)
    # Whatever put it there, a symlink in the io directory is not followed on the host.
    output_log = gateway_settings.state_dir / "instances" / instance_id / "io" / "output.log"
    output_log.rename(output_log.with_name("moved.log"))
    output_log.symlink_to(secret_file)

    text = await read_output(client, instance_id)

    assert SECRET not in text


@pytest.mark.root
@pytest.mark.criu
async def test_snapshot_does_not_copy_host_file(
    client: ComputeClient,
    build_image: ImageBuilder,
    callbacks: CallbackReceiver,
    gateway_settings: GatewaySettings,
    secret_file: Path,
) -> None:
    instance_id = await start_io_probe(client, build_image, secret_file)
    await wait_for_output(client, instance_id, lambda text: "RESULT" in text or SECRET in text)

    await client.instances.snapshot(
        instance_id, SnapshotRequest(callback=CallbackTarget(url=callbacks.url))
    )
    callback = (await callbacks.next()).json()

    assert callback["status"] == "completed", callback
    snapshot_dir = gateway_settings.state_dir / "snapshots" / callback["snapshot_id"]
    for path in snapshot_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), path
