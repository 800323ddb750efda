"""The baseline of the overhead benchmark: a workflow that only runs no-op activities.

It lives in a module of its own with few imports, because Temporal's workflow
sandbox re-imports the module that defines a workflow.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow

BARE_WORKFLOW = "BenchBareWorkflow"


@activity.defn(name="bench_noop")
def noop(step: int) -> int:
    """Do nothing; synchronous like vmflow's database and span activities."""
    return step


@workflow.defn(name=BARE_WORKFLOW)
class BareWorkflow:
    """Run `activities` no-op activities one after another, as a run's steps are."""

    @workflow.run
    async def run(self, activities: int) -> int:
        for step in range(activities):
            await workflow.execute_activity(
                noop, step, start_to_close_timeout=timedelta(seconds=30)
            )
        return activities
