"""Scale: many runs suspended at once on one worker, then resumed together.

Each run provisions, requests a suspend at a token waitpoint, and is snapshotted
once the snapshot delay passes, so it holds no instance. With every run
SUSPENDED the benchmark reads the resident memory of the worker (this
process) and of the Temporal server, then resolves every waitpoint at once
and times until every run is EXECUTING again (restored). Finally every task
returns, and each run must end COMPLETED with one snapshot and one restore:
a run that ends otherwise, or never ends, counts as lost.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from temporalio.client import WorkflowHandle

from bench.orchestration import (
    REAL_PARTS,
    SIMULATED_PARTS,
    Orchestration,
    gather_limited,
    orchestration,
)
from bench.processes import own_rss_bytes
from bench.report import Table, emit, format_mib, format_ms
from workflows import contract

# Runs the harness starts or signals at once; it bounds the client, not the worker.
CLIENT_CONCURRENCY = 50
SNAPSHOT_DELAY_MS = 200


@dataclass
class ScaleResult:
    runs: int
    worker_rss_idle: int = 0
    server_rss_idle: int = 0
    worker_rss_suspended: int = 0
    server_rss_suspended: int = 0
    worker_rss_after: int = 0
    server_rss_after: int = 0
    suspend_all_s: float = 0.0
    resume_all_s: float = 0.0
    resume_latencies_s: list[float] = field(default_factory=list)
    completed: int = 0
    lost: list[str] = field(default_factory=list)
    visible_suspended: int | None = None


@dataclass
class _Run:
    run_id: str
    handle: WorkflowHandle[Any, Any] | None = None
    runner_id: str = ""
    resolved_at: float = 0.0


async def _suspend(harness: Orchestration, run: _Run) -> None:
    run.handle, run.runner_id = await harness.start_run(
        run.run_id, snapshot_delay_ms=SNAPSHOT_DELAY_MS
    )
    await run.handle.signal(
        contract.SIGNAL_SUSPEND_REQUESTED,
        contract.SuspendRequested(run.runner_id, f"wp-{run.run_id}", contract.WaitpointKind.TOKEN),
    )
    await harness.wait_for_status(run.run_id, "SUSPENDED", after=0.0)


async def _resolve(run: _Run) -> None:
    assert run.handle is not None
    run.resolved_at = time.monotonic()
    await run.handle.signal(
        contract.SIGNAL_WAITPOINT_COMPLETED, contract.WaitpointCompleted(f"wp-{run.run_id}")
    )


async def _finish(harness: Orchestration, run: _Run) -> contract.RunExecutionResult:
    assert run.handle is not None
    # A restore gives the run its second runner id.
    return await harness.finish_run(run.handle, contract.runner_id_for(run.run_id, 2))


def _memory(harness: Orchestration) -> tuple[int, int]:
    gc.collect()
    return own_rss_bytes(), harness.server.rss_bytes()


async def _count_visible_suspended(harness: Orchestration, run_ids: set[str]) -> int:
    """Count, through the server's visibility store, the runs whose VmflowRunState is SUSPENDED."""
    query = f'{contract.SEARCH_RUN_STATE.name} = "SUSPENDED" AND TaskQueue = "{harness.task_queue}"'
    count = 0
    async for execution in harness.client.list_workflows(query):
        if execution.id.removeprefix("run-") in run_ids:
            count += 1
    return count


async def measure(runs: int) -> ScaleResult:
    result = ScaleResult(runs)
    async with orchestration() as harness:
        result.worker_rss_idle, result.server_rss_idle = _memory(harness)
        batch = [_Run(run_id) for run_id in harness.seed_runs(runs)]

        started = time.monotonic()
        await gather_limited(
            [lambda run=run: _suspend(harness, run) for run in batch], CLIENT_CONCURRENCY
        )
        result.suspend_all_s = time.monotonic() - started
        # The worker's calls log of the double grows with every call; it is not worker state.
        harness.gateway.calls.clear()
        result.worker_rss_suspended, result.server_rss_suspended = _memory(harness)
        # Visibility is eventually consistent; a short wait lets the last upserts land.
        await asyncio.sleep(1.0)
        result.visible_suspended = await _count_visible_suspended(
            harness, {run.run_id for run in batch}
        )

        started = time.monotonic()
        await gather_limited([lambda run=run: _resolve(run) for run in batch], CLIENT_CONCURRENCY)
        executing_at = await asyncio.gather(
            *(
                harness.wait_for_status(run.run_id, "EXECUTING", after=run.resolved_at)
                for run in batch
            )
        )
        result.resume_all_s = max(executing_at) - started
        result.resume_latencies_s = [
            at - run.resolved_at for at, run in zip(executing_at, batch, strict=True)
        ]
        result.worker_rss_after, result.server_rss_after = _memory(harness)

        outcomes = await gather_limited(
            [lambda run=run: _finish(harness, run) for run in batch], CLIENT_CONCURRENCY
        )
        for run, outcome in zip(batch, outcomes, strict=True):
            ok = (
                outcome.state == contract.RunState.COMPLETED
                and outcome.snapshot_count == 1
                and outcome.restore_count == 1
            )
            if ok:
                result.completed += 1
            else:
                result.lost.append(
                    f"{run.run_id}: {outcome.state}, {outcome.snapshot_count} snapshots, "
                    f"{outcome.restore_count} restores"
                )
    return result


def report(result: ScaleResult) -> None:
    emit(REAL_PARTS)
    emit(SIMULATED_PARTS)
    emit(
        f"{result.runs} runs on one worker, snapshot delay {SNAPSHOT_DELAY_MS} ms, "
        f"the harness starts and signals at most {CLIENT_CONCURRENCY} at once"
    )
    table = Table("figure", "value")
    table.add(
        f"time to suspend all {result.runs} (start -> SUSPENDED)", f"{result.suspend_all_s:.1f} s"
    )
    table.add(
        "runs SUSPENDED in Temporal visibility",
        "n/a" if result.visible_suspended is None else result.visible_suspended,
    )
    table.add("worker RSS, idle before the runs", format_mib(result.worker_rss_idle))
    table.add(f"worker RSS, {result.runs} suspended", format_mib(result.worker_rss_suspended))
    table.add("worker RSS, all resumed", format_mib(result.worker_rss_after))
    table.add("Temporal server RSS, idle", format_mib(result.server_rss_idle))
    table.add(
        f"Temporal server RSS, {result.runs} suspended", format_mib(result.server_rss_suspended)
    )
    table.add("Temporal server RSS, all resumed", format_mib(result.server_rss_after))
    table.add(
        f"time to resume all {result.runs} (first resolve -> last EXECUTING)",
        f"{result.resume_all_s:.1f} s",
    )
    table.add(
        "per-run resume latency, median",
        format_ms(statistics.median(result.resume_latencies_s) * 1000),
    )
    table.add("per-run resume latency, max", format_ms(max(result.resume_latencies_s) * 1000))
    table.add(
        "runs completed with 1 snapshot and 1 restore", f"{result.completed} of {result.runs}"
    )
    table.add("runs lost", len(result.lost))
    emit(table.render())
    for line in result.lost[:10]:
        emit(f"  lost: {line}")
    emit(
        "NOTE: the worker RSS is this benchmark process: the worker, the gateway double and the "
        "client that drives the runs share it."
    )
