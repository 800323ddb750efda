"""A workflow with one activity runs on the time-skipping server and on the dev server."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

RUN_ID = SearchAttributeKey.for_keyword("VmflowRunId")
RUN_STATE = SearchAttributeKey.for_keyword("VmflowRunState")


@dataclass
class Greeting:
    name: str
    sleep_s: float = 0
    upsert_state: bool = False


@activity.defn
async def greet(name: str) -> str:
    return f"hello, {name} (attempt {activity.info().attempt})"


@workflow.defn
class GreetingWorkflow:
    @workflow.run
    async def run(self, greeting: Greeting) -> str:
        if greeting.sleep_s:
            await workflow.sleep(greeting.sleep_s)
        if greeting.upsert_state:
            workflow.upsert_search_attributes([RUN_STATE.value_set("EXECUTING")])
        return await workflow.execute_activity(
            greet, greeting.name, start_to_close_timeout=timedelta(seconds=30)
        )


async def test_workflow_runs_on_the_time_skipping_server(
    temporal_test_env: WorkflowEnvironment,
) -> None:
    assert temporal_test_env.supports_time_skipping
    task_queue = f"smoke-{uuid.uuid4()}"
    started = time.monotonic()
    async with Worker(
        temporal_test_env.client,
        task_queue=task_queue,
        workflows=[GreetingWorkflow],
        activities=[greet],
    ):
        result = await temporal_test_env.client.execute_workflow(
            GreetingWorkflow.run,
            Greeting("skipper", sleep_s=3600),  # an hour of workflow time
            id=f"smoke-{uuid.uuid4()}",
            task_queue=task_queue,
        )

    assert result == "hello, skipper (attempt 1)"
    assert time.monotonic() - started < 60  # the hour was skipped


@pytest.mark.slow
async def test_workflow_runs_on_the_dev_server_with_search_attributes(
    temporal_dev_env: WorkflowEnvironment,
) -> None:
    assert not temporal_dev_env.supports_time_skipping
    task_queue = f"smoke-{uuid.uuid4()}"
    run_id = f"run_{uuid.uuid4().hex}"
    async with Worker(
        temporal_dev_env.client,
        task_queue=task_queue,
        workflows=[GreetingWorkflow],
        activities=[greet],
    ):
        handle = await temporal_dev_env.client.start_workflow(
            GreetingWorkflow.run,
            Greeting("dev", upsert_state=True),
            id=f"smoke-{uuid.uuid4()}",
            task_queue=task_queue,
            search_attributes=TypedSearchAttributes([SearchAttributePair(RUN_ID, run_id)]),
        )
        assert await handle.result() == "hello, dev (attempt 1)"

    description = await handle.describe()
    assert description.status is WorkflowExecutionStatus.COMPLETED
    assert description.typed_search_attributes[RUN_ID] == run_id
    assert description.typed_search_attributes[RUN_STATE] == "EXECUTING"
