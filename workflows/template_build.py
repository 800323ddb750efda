"""TemplateBuildWorkflow: ask the gateway for a template and wait for its callback."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.database import DatabaseActivities, DeploymentUpdateInput
    from activities.gateway import GatewayActivities, TemplateCreateInput
    from workflows.contract import (
        SEARCH_DEPLOYMENT_ID,
        SIGNAL_TEMPLATE_FINISHED,
        TEMPLATE_BUILD_WORKFLOW,
        SnapshotStatus,
        TemplateBuildInput,
        TemplateBuildResult,
        TemplateFinished,
    )
    from workflows.options import (
        DATABASE_RETRY,
        DATABASE_TIMEOUT,
        GATEWAY_CALL_TIMEOUT,
        GATEWAY_RETRY,
    )


@workflow.defn(name=TEMPLATE_BUILD_WORKFLOW)
class TemplateBuildWorkflow:
    """Builds one deployment's template and returns whether it succeeded instead of raising."""

    def __init__(self) -> None:
        self._finished: TemplateFinished | None = None

    @workflow.signal(name=SIGNAL_TEMPLATE_FINISHED)
    def template_finished(self, message: TemplateFinished) -> None:
        """Record the gateway's template callback; the first one counts."""
        if self._finished is None:
            self._finished = message

    @workflow.run
    async def run(self, input: TemplateBuildInput) -> TemplateBuildResult:
        workflow.upsert_search_attributes([SEARCH_DEPLOYMENT_ID.value_set(input.deployment_id)])
        workflow.set_current_details(f"building the template of **{input.image}**")
        try:
            started = await workflow.execute_activity_method(
                GatewayActivities.create_template,
                TemplateCreateInput(
                    deployment_id=input.deployment_id,
                    image=input.image,
                    cpu=input.cpu,
                    memory_gb=input.memory_gb,
                ),
                start_to_close_timeout=GATEWAY_CALL_TIMEOUT,
                retry_policy=GATEWAY_RETRY,
                summary=f"create template of {input.image}",
            )
        except ActivityError as error:
            cause = str(error.cause) if error.cause is not None else str(error)
            failed = TemplateBuildResult(input.deployment_id, False, error=cause)
            return await self._done(input, failed)

        if started.template_id is not None:
            result = TemplateBuildResult(input.deployment_id, True, template_id=started.template_id)
            return await self._done(input, result)

        try:
            await workflow.wait_condition(
                lambda: self._finished is not None,
                timeout=timedelta(seconds=input.timeout_s),
                timeout_summary=f"template callback for {input.image}",
            )
        except TimeoutError:
            reason = f"no template callback within {input.timeout_s:g} s"
            failed = TemplateBuildResult(input.deployment_id, False, error=reason)
            return await self._done(input, failed)

        finished = self._finished
        assert finished is not None
        ok = finished.status == SnapshotStatus.COMPLETED
        result = TemplateBuildResult(
            deployment_id=input.deployment_id,
            ok=ok,
            template_id=finished.template_id,
            error=None if ok else (finished.error or "the gateway reported a failed build"),
            duration_ms=finished.duration_ms,
        )
        return await self._done(input, result)

    async def _done(
        self, input: TemplateBuildInput, result: TemplateBuildResult
    ) -> TemplateBuildResult:
        if result.ok:
            workflow.set_current_details(
                f"template **{result.template_id}** of {input.image} ready"
            )
        else:
            workflow.logger.warning(
                "template build of deployment %s (%s) failed: %s",
                input.deployment_id,
                input.image,
                result.error,
            )
            workflow.set_current_details(f"template build of {input.image} failed: {result.error}")
        if input.record_on_deployment and result.ok:
            await workflow.execute_activity_method(
                DatabaseActivities.record_deployment,
                DeploymentUpdateInput(
                    deployment_id=input.deployment_id,
                    status="DEPLOYED",
                    template_id=result.template_id,
                ),
                start_to_close_timeout=DATABASE_TIMEOUT,
                retry_policy=DATABASE_RETRY,
                summary=f"record template {result.template_id}",
            )
        return result
