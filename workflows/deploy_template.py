"""DeployTemplateWorkflow: decide a deployment's template mode and act on it.

- required: the project's default worker group runs MICROVM workloads. The
  template is built before the deployment is DEPLOYED, and a failed build
  fails the deployment with the error name TemplateCreationFailed.
- shadow: the organization has the hasComputeAccess flag, or the deployment
  falls inside the shadow rollout percentage. The build runs as an abandoned
  child workflow and the deployment does not wait for it.
- skip: neither applies, or no gateway is configured.
"""

from __future__ import annotations

import hashlib

from temporalio import workflow
from temporalio.exceptions import ActivityError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.database import (
        DatabaseActivities,
        DeploymentContextInput,
        DeploymentContextResult,
        DeploymentUpdateInput,
    )
    from workflows.contract import (
        DEPLOY_TEMPLATE_WORKFLOW,
        QUERY_DEPLOYMENT_STATE,
        SEARCH_DEPLOYMENT_ID,
        DeployTemplateInput,
        DeployTemplateResult,
        TemplateBuildInput,
        template_build_workflow_id,
    )
    from workflows.options import DATABASE_RETRY, DATABASE_TIMEOUT
    from workflows.template_build import TemplateBuildWorkflow

TEMPLATE_CREATION_FAILED = "TemplateCreationFailed"

REQUIRED = "required"
SHADOW = "shadow"
SKIP = "skip"


def rollout_bucket(deployment_id: str) -> float:
    """Place a deployment in [0, 100) by a hash of its id, the same on every replay and host."""
    digest = hashlib.sha256(deployment_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10_000 / 100


def decide_template_mode(context: DeploymentContextResult) -> str:
    """Return the template mode of a deployment: required, shadow or skip."""
    if not context.gateway_configured:
        return SKIP
    if context.workload_type == "MICROVM":
        return REQUIRED
    if context.has_compute_access:
        return SHADOW
    if rollout_bucket(context.deployment_id) < context.shadow_rollout_pct:
        return SHADOW
    return SKIP


@workflow.defn(name=DEPLOY_TEMPLATE_WORKFLOW)
class DeployTemplateWorkflow:
    """Rolls out a deployment's template in the mode its project and organization select."""

    def __init__(self) -> None:
        self._state = DeployTemplateResult(deployment_id="", template_mode="", status="PENDING")

    @workflow.query(name=QUERY_DEPLOYMENT_STATE)
    def deployment_state(self) -> DeployTemplateResult:
        """Return the template mode and deployment status decided so far."""
        return self._state

    @workflow.run
    async def run(self, input: DeployTemplateInput) -> DeployTemplateResult:
        self._state.deployment_id = input.deployment_id
        workflow.upsert_search_attributes([SEARCH_DEPLOYMENT_ID.value_set(input.deployment_id)])

        context = await workflow.execute_activity_method(
            DatabaseActivities.load_deployment_context,
            DeploymentContextInput(deployment_id=input.deployment_id),
            start_to_close_timeout=DATABASE_TIMEOUT,
            retry_policy=DATABASE_RETRY,
            summary=f"load deployment {input.deployment_id}",
        )
        mode = decide_template_mode(context)
        self._state.template_mode = mode
        workflow.logger.info("deployment %s: template mode %s", input.deployment_id, mode)
        build = TemplateBuildInput(
            deployment_id=input.deployment_id,
            image=context.image,
            cpu=input.cpu,
            memory_gb=input.memory_gb,
            timeout_s=input.template_timeout_s,
            record_on_deployment=mode == SHADOW,
        )

        if mode == REQUIRED:
            await self._record("BUILDING_TEMPLATE")
            result = await workflow.execute_child_workflow(
                TemplateBuildWorkflow.run,
                build,
                id=template_build_workflow_id(input.deployment_id),
                static_summary=f"required template of {context.image}",
            )
            if not result.ok:
                self._state.error_name = TEMPLATE_CREATION_FAILED
                self._state.error_message = result.error
                return await self._record("FAILED")
            self._state.template_id = result.template_id
            return await self._record("DEPLOYED")

        if mode == SHADOW:
            await workflow.start_child_workflow(
                TemplateBuildWorkflow.run,
                build,
                id=template_build_workflow_id(input.deployment_id),
                parent_close_policy=ParentClosePolicy.ABANDON,
                static_summary=f"shadow template of {context.image}",
            )
        return await self._record("DEPLOYED")

    async def _record(self, status: str) -> DeployTemplateResult:
        self._state.status = status
        details = f"**{status}** · template mode `{self._state.template_mode}`"
        if self._state.error_name:
            details += f" · {self._state.error_name}: {self._state.error_message}"
        workflow.set_current_details(details)
        try:
            await workflow.execute_activity_method(
                DatabaseActivities.record_deployment,
                DeploymentUpdateInput(
                    deployment_id=self._state.deployment_id,
                    status=status,
                    template_mode=self._state.template_mode,
                    template_id=self._state.template_id,
                    error_name=self._state.error_name,
                    error_message=self._state.error_message,
                ),
                start_to_close_timeout=DATABASE_TIMEOUT,
                retry_policy=DATABASE_RETRY,
                summary=f"record deployment {status}",
            )
        except ActivityError:
            workflow.logger.error(
                "deployment %s: failed to record status %s", self._state.deployment_id, status
            )
            raise
        return self._state
