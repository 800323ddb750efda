"""DeployTemplateWorkflow's template modes against the recording gateway double."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from temporalio.client import WorkflowHandle

from tests.workflows.conftest import Harness, assert_replays, seed_deployment
from vmflow.storage.db import session_scope
from vmflow.storage.models import Deployment, DeploymentStatus, TemplateMode, WorkloadType
from workflows.contract import (
    DeployTemplateInput,
    DeployTemplateResult,
    deploy_workflow_id,
    template_build_workflow_id,
)
from workflows.deploy_template import (
    TEMPLATE_CREATION_FAILED,
    DeployTemplateWorkflow,
    rollout_bucket,
)
from workflows.template_build import TemplateBuildWorkflow


async def deploy(harness: Harness, deployment_id: str) -> WorkflowHandle[Any, DeployTemplateResult]:
    return await harness.client.start_workflow(
        DeployTemplateWorkflow.run,
        DeployTemplateInput(deployment_id=deployment_id),
        id=deploy_workflow_id(deployment_id),
        task_queue=harness.task_queue,
    )


def deployment_row(harness: Harness, deployment_id: str) -> Deployment:
    with session_scope(harness.sessions) as session:
        deployment = session.get(Deployment, deployment_id)
        assert deployment is not None
        return deployment


def deployment_id_in_bucket(inside: bool, pct: float) -> str:
    """Return a fresh deployment id whose rollout bucket is inside (or outside) `pct`."""
    for _ in itertools.count():
        candidate = f"dep_{uuid.uuid4().hex}"
        if (rollout_bucket(candidate) < pct) == inside:
            return candidate
    raise AssertionError("unreachable")


async def test_deploy_microvm_group_requires_template(dev_harness: Harness) -> None:
    await dev_harness.start_workers()
    seeded = seed_deployment(dev_harness.sessions, workload_type=WorkloadType.MICROVM)

    handle = await deploy(dev_harness, seeded.deployment_id)
    result = await handle.result()

    assert result.template_mode == "required"
    assert result.status == "DEPLOYED"
    created = dev_harness.gateway.calls_of("templates.create")
    assert len(created) == 1
    assert created[0].body["image"] == seeded.image.split("@")[0]
    assert created[0].body["background"] is True
    assert created[0].body["callback"]["metadata"] == {"deployment_id": seeded.deployment_id}
    row = deployment_row(dev_harness, seeded.deployment_id)
    assert row.status == DeploymentStatus.DEPLOYED
    assert row.template_mode == TemplateMode.REQUIRED
    assert row.template_id == result.template_id
    assert row.template_id is not None
    await assert_replays(handle, "deploy_required")


async def test_deploy_required_failure_fails_deployment(dev_harness: Harness) -> None:
    await dev_harness.start_workers()
    dev_harness.gateway.template_mode = "failed"
    seeded = seed_deployment(dev_harness.sessions, workload_type=WorkloadType.MICROVM)

    result = await (await deploy(dev_harness, seeded.deployment_id)).result()

    assert result.status == "FAILED"
    assert result.error_name == TEMPLATE_CREATION_FAILED
    row = deployment_row(dev_harness, seeded.deployment_id)
    assert row.status == DeploymentStatus.FAILED
    assert row.error_name == "TemplateCreationFailed"
    assert row.error_message is not None
    assert "runner never became ready" in row.error_message
    assert row.template_id is None


async def test_deploy_feature_flag_builds_shadow_template(dev_harness: Harness) -> None:
    await dev_harness.start_workers()
    seeded = seed_deployment(dev_harness.sessions, feature_flags={"hasComputeAccess": True})

    handle = await deploy(dev_harness, seeded.deployment_id)
    result = await handle.result()

    assert result.template_mode == "shadow"
    assert result.status == "DEPLOYED"
    # The build goes on after the deployment finished, and records its template.
    build = dev_harness.client.get_workflow_handle_for(
        TemplateBuildWorkflow.run, template_build_workflow_id(seeded.deployment_id)
    )
    built = await build.result()
    assert built.ok is True
    row = deployment_row(dev_harness, seeded.deployment_id)
    assert row.status == DeploymentStatus.DEPLOYED
    assert row.template_mode == TemplateMode.SHADOW
    assert row.template_id == built.template_id
    await assert_replays(handle, "deploy_shadow")
    await assert_replays(build, "template_build")


async def test_deploy_shadow_failure_keeps_deployment(dev_harness: Harness) -> None:
    await dev_harness.start_workers()
    dev_harness.gateway.template_mode = "failed"
    seeded = seed_deployment(dev_harness.sessions, feature_flags={"hasComputeAccess": True})

    result = await (await deploy(dev_harness, seeded.deployment_id)).result()
    build = dev_harness.client.get_workflow_handle_for(
        TemplateBuildWorkflow.run, template_build_workflow_id(seeded.deployment_id)
    )
    built = await build.result()

    assert result.status == "DEPLOYED"
    assert built.ok is False
    row = deployment_row(dev_harness, seeded.deployment_id)
    assert row.status == DeploymentStatus.DEPLOYED
    assert row.error_name is None


async def test_deploy_rollout_percentage_is_stable(dev_harness: Harness) -> None:
    dev_harness.shadow_rollout_pct = 30.0
    await dev_harness.start_workers()
    inside = deployment_id_in_bucket(True, 30.0)
    outside = deployment_id_in_bucket(False, 30.0)
    seed_deployment(dev_harness.sessions, deployment_id=inside)
    seed_deployment(dev_harness.sessions, deployment_id=outside)

    inside_handle = await deploy(dev_harness, inside)
    outside_handle = await deploy(dev_harness, outside)
    assert (await inside_handle.result()).template_mode == "shadow"
    assert (await outside_handle.result()).template_mode == "skip"
    inside_build = dev_harness.client.get_workflow_handle_for(
        TemplateBuildWorkflow.run, template_build_workflow_id(inside)
    )
    assert (await inside_build.result()).ok is True

    # The bucket is a SHA-256 of the id alone, the same in every process, and
    # replays take the percentage from the activity result in history.
    assert rollout_bucket("dep_0001") == 88.65
    assert rollout_bucket("dep_0002") == 73.49
    await assert_replays(inside_handle)
    await assert_replays(outside_handle)


async def test_deploy_without_group_or_flag_skips(dev_harness: Harness) -> None:
    await dev_harness.start_workers()
    seeded = seed_deployment(dev_harness.sessions, with_group=False)

    result = await (await deploy(dev_harness, seeded.deployment_id)).result()

    assert result.template_mode == "skip"
    assert result.status == "DEPLOYED"
    assert dev_harness.gateway.calls_of("templates.create") == []
    row = deployment_row(dev_harness, seeded.deployment_id)
    assert row.template_mode == TemplateMode.SKIP
    assert row.status == DeploymentStatus.DEPLOYED
    assert row.deployed_at is not None


async def test_deploy_without_gateway_skips(dev_harness: Harness) -> None:
    dev_harness.gateway_configured = False
    await dev_harness.start_workers()
    seeded = seed_deployment(
        dev_harness.sessions,
        workload_type=WorkloadType.MICROVM,
        feature_flags={"hasComputeAccess": True},
    )

    result = await (await deploy(dev_harness, seeded.deployment_id)).result()

    assert result.template_mode == "skip"
    assert result.status == "DEPLOYED"
    assert dev_harness.gateway.calls == []


async def test_deploy_lost_template_callback_times_out(harness: Harness) -> None:
    # Time-skipping server: the build's timeout timer is skipped, not waited for.
    await harness.start_workers()
    harness.gateway.template_mode = "lost"
    seeded = seed_deployment(harness.sessions, workload_type=WorkloadType.MICROVM)

    handle = await harness.client.start_workflow(
        DeployTemplateWorkflow.run,
        DeployTemplateInput(deployment_id=seeded.deployment_id, template_timeout_s=600),
        id=deploy_workflow_id(seeded.deployment_id),
        task_queue=harness.task_queue,
    )
    result = await handle.result()

    assert result.status == "FAILED"
    assert result.error_name == TEMPLATE_CREATION_FAILED
    assert result.error_message == "no template callback within 600 s"
    assert deployment_row(harness, seeded.deployment_id).status == DeploymentStatus.FAILED
