"""Snapshots and templates on real sandboxes with real CRIU."""

from __future__ import annotations

import re

import pytest

from vmflow.compute.client import ComputeClient
from vmflow.compute.errors import ComputeHTTPError
from vmflow.compute.models import (
    CallbackTarget,
    InstanceCreateRequest,
    InstanceState,
    SnapshotRequest,
    SnapshotRestoreRequest,
    SnapshotState,
    TemplateCreateRequest,
)
from vmflow.gateway.server import GatewayServer
from vmflow.gateway.settings import GatewaySettings

from .conftest import (
    CallbackReceiver,
    ImageBuilder,
    read_output,
    ticks,
    unique,
    wait_for_output,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]


def assert_continues(before: str, after: str) -> None:
    """Check that `after` extends `before` with ticks that go on from the last one exactly."""
    assert after.startswith(before), "the restored output does not keep the snapshot's output"
    old_ticks = ticks(before)
    new_ticks = ticks(after[len(before) :])
    assert old_ticks, "the instance printed no tick before the snapshot"
    assert new_ticks, "the restored instance printed no tick"
    last_counter, checksum = old_ticks[-1]
    assert new_ticks[0][0] == last_counter + 1
    assert [counter for counter, _ in new_ticks] == list(
        range(last_counter + 1, last_counter + 1 + len(new_ticks))
    )
    assert {value for _, value in new_ticks} == {checksum}
    # The process was restored, not started again.
    assert after.count("start pid=") == 1


async def test_snapshot_restore_keeps_memory_state(
    client: ComputeClient,
    build_image: ImageBuilder,
    callbacks: CallbackReceiver,
    gateway_settings: GatewaySettings,
) -> None:
    image = build_image("counter.py")
    created = await client.instances.create(
        InstanceCreateRequest(
            name=unique("counter"),
            image=image,
            env={"VMFLOW_RUNNER_ID": "runner-1", "VMFLOW_WORKLOAD_TOKEN": "token-1"},
            cpu=1,
            memory_gb=0.5,
        )
    )
    assert created.timing is not None
    assert created.timing["mode"] == "cold"
    await wait_for_output(
        client, created.id, lambda text: "identity generation=0 runner=runner-1" in text
    )

    await client.instances.snapshot(
        created.id,
        SnapshotRequest(callback=CallbackTarget(url=callbacks.url, metadata={"run": "r1"})),
    )
    callback = (await callbacks.next()).json()
    assert callback["status"] == "completed", callback
    assert callback["instance_id"] == created.id
    assert callback["metadata"] == {"run": "r1"}
    snapshot_id = callback["snapshot_id"]
    snapshot = await client.snapshots.get(snapshot_id)
    assert snapshot.state == SnapshotState.COMPLETED
    assert snapshot.size_bytes is not None and snapshot.size_bytes > 20 * 1024 * 1024
    stopped = await client.instances.get(created.id)
    assert stopped.state == InstanceState.STOPPED

    before = await read_output(client, created.id)
    await client.instances.delete(created.id)

    restored = await client.snapshots.restore(
        snapshot_id,
        SnapshotRestoreRequest(
            name=unique("restored"),
            metadata={"VMFLOW_RUNNER_ID": "runner-2"},
            cpu=1,
            memory_gb=0.5,
        ),
    )
    assert restored is not None
    assert restored.id != created.id
    after = await wait_for_output(client, restored.id, lambda text: "runner=runner-2" in text)
    assert_continues(before, after)
    assert "identity generation=1 runner=runner-2" in after
    # The scratch file the process kept open came along and goes on from the same line.
    scratch = gateway_settings.state_dir / "instances" / restored.id / "scratch" / "ticks.txt"
    written = [int(line) for line in scratch.read_text().split()]
    assert written[: len(ticks(before))] == [counter for counter, _ in ticks(before)]
    assert written == list(range(1, len(written) + 1))
    instance = await client.instances.get(restored.id)
    assert instance.state == InstanceState.RUNNING
    assert instance.model_extra is not None
    assert instance.model_extra["restored_from"] == snapshot_id


async def test_snapshot_restore_twice_from_one_snapshot(
    client: ComputeClient, build_image: ImageBuilder, callbacks: CallbackReceiver
) -> None:
    image = build_image("counter.py")
    created = await client.instances.create(
        InstanceCreateRequest(name=unique("counter"), image=image, cpu=1, memory_gb=0.25)
    )
    await wait_for_output(client, created.id, lambda text: "tick 3 " in text)
    await client.instances.snapshot(
        created.id, SnapshotRequest(callback=CallbackTarget(url=callbacks.url))
    )
    snapshot_id = (await callbacks.next()).json()["snapshot_id"]
    before = await read_output(client, created.id)

    for _ in range(2):
        restored = await client.snapshots.restore(
            snapshot_id,
            SnapshotRestoreRequest(name=unique("copy"), cpu=1, memory_gb=0.25),
        )
        assert restored is not None
        expected = f"tick {ticks(before)[-1][0] + 3} "
        after = await wait_for_output(
            client, restored.id, lambda text, expected=expected: expected in text
        )
        assert_continues(before, after)


async def test_template_create_restores_ready_state(
    client: ComputeClient, build_image: ImageBuilder
) -> None:
    image = build_image("counter.py")
    template = await client.templates.create(
        TemplateCreateRequest(image=image, cpu=1, memory_gb=0.5)
    )
    assert template is not None
    assert template.status == "completed", template

    created = await client.instances.create(
        InstanceCreateRequest(
            name=unique("from-template"),
            image=image,
            env={"VMFLOW_RUNNER_ID": "runner-t"},
            cpu=1,
            memory_gb=0.5,
        )
    )
    assert created.timing is not None
    assert created.timing["mode"] == "template"
    output = await wait_for_output(client, created.id, lambda text: "runner=runner-t" in text)
    # The template was checkpointed after its ready call; the instance goes on from there.
    assert output.count("start pid=") == 1
    counters = [counter for counter, _ in ticks(output)]
    assert counters == list(range(counters[0], counters[0] + len(counters)))
    assert len({checksum for _, checksum in ticks(output)}) == 1
    assert re.search(r"identity generation=0 runner=runner-t", output)


async def test_template_background_calls_back(
    client: ComputeClient, build_image: ImageBuilder, callbacks: CallbackReceiver
) -> None:
    image = build_image("counter.py")
    accepted = await client.templates.create(
        TemplateCreateRequest(
            image=image,
            cpu=1,
            memory_gb=0.25,
            background=True,
            callback=CallbackTarget(url=callbacks.url, metadata={"deployment": "d1"}),
        )
    )
    assert accepted is None
    callback = (await callbacks.next()).json()
    assert callback["status"] == "completed", callback
    assert callback["image"] == image
    assert callback["metadata"] == {"deployment": "d1"}
    assert callback["template_id"].startswith("tpl_")


async def test_template_fails_when_runtime_exits(
    client: ComputeClient, build_image: ImageBuilder
) -> None:
    image = build_image("probe.py", command=["python", "-c", "raise SystemExit(3)"])
    template = await client.templates.create(
        TemplateCreateRequest(image=image, cpu=1, memory_gb=0.25)
    )
    assert template is not None
    assert template.status == "failed"
    assert template.model_extra is not None
    assert "exited before it reported ready" in template.model_extra["error"]


@pytest.mark.root
async def test_snapshot_without_criu_fails_cleanly(
    gateway_settings: GatewaySettings, build_image: ImageBuilder, callbacks: CallbackReceiver
) -> None:
    settings = gateway_settings.model_copy(update={"criu": "/nonexistent/criu"})
    async with (
        GatewayServer(settings) as server,
        ComputeClient(
            server.url,
            auth_token=settings.auth_token.get_secret_value(),  # type: ignore[union-attr]
        ) as compute,
    ):
        try:
            health = await compute.health()
            assert health.drivers[0].snapshots is False
            assert "criu" in (health.drivers[0].detail or "")

            image = build_image("counter.py")
            created = await compute.instances.create(
                InstanceCreateRequest(name=unique("no-criu"), image=image, cpu=1, memory_gb=0.25)
            )
            await wait_for_output(compute, created.id, lambda text: "tick 2 " in text)
            await compute.instances.snapshot(
                created.id, SnapshotRequest(callback=CallbackTarget(url=callbacks.url))
            )
            callback = (await callbacks.next()).json()
            assert callback["status"] == "failed"
            assert "CRIU" in callback["error"] or "criu" in callback["error"]
            instance = await compute.instances.get(created.id)
            assert instance.state == InstanceState.RUNNING
            output = await read_output(compute, created.id)
            last = ticks(output)[-1][0]
            await wait_for_output(compute, created.id, lambda text: f"tick {last + 2} " in text)
        finally:
            from .conftest import delete_all_instances

            await delete_all_instances(server)


async def test_snapshot_of_restored_instance(
    client: ComputeClient, build_image: ImageBuilder, callbacks: CallbackReceiver
) -> None:
    image = build_image("counter.py")
    created = await client.instances.create(
        InstanceCreateRequest(name=unique("chain"), image=image, cpu=1, memory_gb=0.25)
    )
    instance_id = created.id
    await wait_for_output(client, instance_id, lambda text: "tick 3 " in text)

    for generation in (1, 2):
        await client.instances.snapshot(
            instance_id, SnapshotRequest(callback=CallbackTarget(url=callbacks.url))
        )
        callback = (await callbacks.next()).json()
        assert callback["status"] == "completed", callback
        before = await read_output(client, instance_id)
        await client.instances.delete(instance_id)

        restored = await client.snapshots.restore(
            callback["snapshot_id"],
            SnapshotRestoreRequest(name=unique(f"chain-{generation}"), cpu=1, memory_gb=0.25),
        )
        assert restored is not None
        instance_id = restored.id
        expected = f"identity generation={generation} "
        after = await wait_for_output(
            client, instance_id, lambda text, expected=expected: expected in text
        )
        assert_continues(before, after)


async def test_template_build_instance_is_hidden(
    client: ComputeClient, build_image: ImageBuilder
) -> None:
    image = build_image("counter.py")
    template = await client.templates.create(
        TemplateCreateRequest(image=image, cpu=1, memory_gb=0.5)
    )
    assert template is not None
    assert template.template_id is not None
    described = (await client.request("GET", f"/api/templates/{template.template_id}")).json()
    snapshot = await client.snapshots.get(described["snapshot_id"])

    # The template's checkpoint came from a build instance that no instance route may touch.
    with pytest.raises(ComputeHTTPError) as caught_get:
        await client.instances.get(snapshot.instance_id)
    with pytest.raises(ComputeHTTPError) as caught_delete:
        await client.instances.delete(snapshot.instance_id)

    assert caught_get.value.status == 404
    assert caught_delete.value.status == 404


async def test_snapshot_restore_keeps_root_read_only(
    client: ComputeClient, build_image: ImageBuilder, callbacks: CallbackReceiver
) -> None:
    image = build_image("root_writer.py")
    created = await client.instances.create(
        InstanceCreateRequest(name=unique("writer"), image=image, cpu=1, memory_gb=0.25)
    )
    before = await wait_for_output(client, created.id, lambda text: "tick 3 " in text)
    await client.instances.snapshot(
        created.id, SnapshotRequest(callback=CallbackTarget(url=callbacks.url))
    )
    snapshot_id = (await callbacks.next()).json()["snapshot_id"]
    before = await read_output(client, created.id)
    await client.instances.delete(created.id)

    restored = await client.snapshots.restore(
        snapshot_id, SnapshotRestoreRequest(name=unique("writer-restored"), cpu=1, memory_gb=0.25)
    )
    assert restored is not None
    last_before = len(re.findall(r"^tick \d+ ", before, re.MULTILINE))
    expected = f"tick {last_before + 5} "
    after = await wait_for_output(
        client, restored.id, lambda text, expected=expected: expected in text
    )

    assert "root=read-only" in before
    assert "root=writable" not in before
    assert "root=writable" not in after
