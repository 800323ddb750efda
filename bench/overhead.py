"""Orchestration overhead: runs per second of a no-op task, against a bare workflow.

The full path starts RunExecutionWorkflow, waits for its instance (the
gateway double), signals runner_started and runner_finished as the API would
for a task that returns at once, and waits for the result. The baseline is a
workflow that runs the same number of no-op activities as one full run
scheduled, on the same server, in a worker with the same settings
(`worker.build_workers`' main-queue settings and thread pool). Both keep
`--concurrency` runs in flight.
"""

from __future__ import annotations

import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker

from bench.bare_workflow import BARE_WORKFLOW, BareWorkflow, noop
from bench.orchestration import (
    REAL_PARTS,
    SIMULATED_PARTS,
    Orchestration,
    gather_limited,
    orchestration,
)
from bench.report import Table, emit, format_ratio
from worker import GRACEFUL_SHUTDOWN
from workflows import contract


@dataclass
class OverheadResult:
    runs: int
    repeats: int
    concurrency: int
    activities_per_run: int
    full_rates: list[float] = field(default_factory=list)
    bare_rates: list[float] = field(default_factory=list)


async def _full_run(harness: Orchestration, run_id: str) -> None:
    handle, runner_id = await harness.start_run(run_id)
    result = await harness.finish_run(handle, runner_id)
    if result.state != contract.RunState.COMPLETED:
        raise RuntimeError(f"run {run_id} ended {result.state}: {result.error}")
    harness.forget(run_id)


async def _count_activities(client: Client, run_id: str) -> int:
    handle = client.get_workflow_handle(contract.run_workflow_id(run_id))
    count = 0
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            count += 1
    return count


async def _full_batch(harness: Orchestration, runs: int, concurrency: int) -> float:
    run_ids = harness.seed_runs(runs)
    started = time.perf_counter()
    await gather_limited(
        [lambda run_id=run_id: _full_run(harness, run_id) for run_id in run_ids], concurrency
    )
    return runs / (time.perf_counter() - started)


async def _bare_batch(
    client: Client, task_queue: str, runs: int, concurrency: int, activities: int
) -> float:
    async def one() -> None:
        await client.execute_workflow(
            BARE_WORKFLOW, activities, id=f"bare-{uuid.uuid4().hex}", task_queue=task_queue
        )

    started = time.perf_counter()
    await gather_limited([one for _ in range(runs)], concurrency)
    return runs / (time.perf_counter() - started)


async def measure(runs: int, repeats: int, concurrency: int, warmup: int) -> OverheadResult:
    bare_queue = f"bench-bare-{uuid.uuid4().hex[:8]}"

    def bare_worker(client: Client, executor: ThreadPoolExecutor) -> list[Worker]:
        # The settings build_workers gives the main worker, so only the workflow differs.
        return [
            Worker(
                client,
                task_queue=bare_queue,
                workflows=[BareWorkflow],
                activities=[noop],
                activity_executor=executor,
                graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
                max_cached_workflows=1000,
            )
        ]

    async with orchestration(bare_worker) as harness:
        probe = harness.seed_runs(1)[0]
        await _full_run(harness, probe)
        activities = await _count_activities(harness.client, probe)
        result = OverheadResult(runs, repeats, concurrency, activities)

        await _full_batch(harness, warmup, concurrency)
        await _bare_batch(harness.client, bare_queue, warmup, concurrency, activities)
        # Alternate the two, so a slow period of the shared machine affects both.
        for _ in range(repeats):
            result.full_rates.append(await _full_batch(harness, runs, concurrency))
            result.bare_rates.append(
                await _bare_batch(harness.client, bare_queue, runs, concurrency, activities)
            )
    return result


def report(result: OverheadResult) -> None:
    emit(REAL_PARTS)
    emit(SIMULATED_PARTS)
    emit(
        f"{result.runs} runs per batch, {result.repeats} batches each, {result.concurrency} "
        f"in flight; one no-op run scheduled {result.activities_per_run} activities, so the "
        f"bare workflow runs {result.activities_per_run} no-op activities"
    )
    full = statistics.median(result.full_rates)
    bare = statistics.median(result.bare_rates)
    table = Table("workflow", "runs/s median", "min", "max")
    table.add(
        "RunExecutionWorkflow, no-op task",
        f"{full:.1f}",
        f"{min(result.full_rates):.1f}",
        f"{max(result.full_rates):.1f}",
    )
    table.add(
        f"bare workflow, {result.activities_per_run} no-op activities",
        f"{bare:.1f}",
        f"{min(result.bare_rates):.1f}",
        f"{max(result.bare_rates):.1f}",
    )
    emit(table.render())
    emit(f"full / bare throughput: {format_ratio(full, bare)}")
    emit(
        "NOTE: the full path also has two signals per run (runner started, finished) and "
        "real SQLite writes; the bare activities write nothing."
    )
