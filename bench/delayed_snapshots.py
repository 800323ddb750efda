"""Delayed snapshots: how many snapshots a waitpoint resolved at a fraction of the delay causes.

A run requests a suspend at a token waitpoint, and the harness resolves the
waitpoint after 10%, 50%, 90% and 200% of COMPUTE_SNAPSHOT_DELAY_MS, counted
from the suspend request. Below 100% the waitpoint wins the race against the
delay timer and the run continues in place, so no snapshot is expected. At
200% the run has been snapshotted and released, and resolving it restores
the snapshot. The latency is from the waitpoint's resolution (the signal
sent) until the run's EXECUTING status is stored again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from bench.orchestration import REAL_PARTS, SIMULATED_PARTS, Orchestration, orchestration
from bench.report import Table, emit, format_ms, format_ratio, median_ms
from workflows import contract

FRACTIONS = (0.1, 0.5, 0.9, 2.0)


@dataclass
class FractionResult:
    fraction: float
    latencies_s: list[float] = field(default_factory=list)
    snapshots: list[int] = field(default_factory=list)
    restores: list[int] = field(default_factory=list)


@dataclass
class DelayedSnapshotsResult:
    delay_ms: int
    repeats: int
    fractions: list[FractionResult]

    def snapshots_below_delay(self) -> int:
        return sum(sum(row.snapshots) for row in self.fractions if row.fraction < 1.0)


async def _one_run(
    harness: Orchestration, fraction: float, delay_ms: int
) -> tuple[float, int, int]:
    """Run one suspend-and-resolve cycle; return (latency s, snapshots, restores)."""
    run_id = harness.seed_runs(1)[0]
    handle, runner_id = await harness.start_run(run_id, snapshot_delay_ms=delay_ms)
    waitpoint_id = f"wp-{run_id}"

    suspended_at = time.monotonic()
    await handle.signal(
        contract.SIGNAL_SUSPEND_REQUESTED,
        contract.SuspendRequested(runner_id, waitpoint_id, contract.WaitpointKind.TOKEN),
    )
    await asyncio.sleep(max(0.0, suspended_at + fraction * delay_ms / 1000 - time.monotonic()))

    resolved_at = time.monotonic()
    await handle.signal(
        contract.SIGNAL_WAITPOINT_COMPLETED, contract.WaitpointCompleted(waitpoint_id, output="ok")
    )
    executing_at = await harness.wait_for_status(run_id, "EXECUTING", after=resolved_at)

    state: contract.RunStateView = await handle.query(
        contract.QUERY_RUN_STATE, result_type=contract.RunStateView
    )
    assert state.runner_id is not None
    result = await harness.finish_run(handle, state.runner_id)
    if result.state != contract.RunState.COMPLETED:
        raise RuntimeError(f"run {run_id} ended {result.state}: {result.error}")
    harness.forget(run_id)
    return executing_at - resolved_at, result.snapshot_count, result.restore_count


async def measure(repeats: int, delay_ms: int, warmup: int) -> DelayedSnapshotsResult:
    rows = [FractionResult(fraction) for fraction in FRACTIONS]
    async with orchestration() as harness:
        for _ in range(warmup):
            await _one_run(harness, FRACTIONS[0], delay_ms)
        # Fractions interleave, so a slow period of the machine affects each about equally.
        for _ in range(repeats):
            for row in rows:
                latency, snapshots, restores = await _one_run(harness, row.fraction, delay_ms)
                row.latencies_s.append(latency)
                row.snapshots.append(snapshots)
                row.restores.append(restores)
    return DelayedSnapshotsResult(delay_ms, repeats, rows)


def report(result: DelayedSnapshotsResult) -> None:
    emit(REAL_PARTS)
    emit(SIMULATED_PARTS)
    emit(
        f"snapshot delay {result.delay_ms} ms, {result.repeats} runs per fraction; latency is "
        "waitpoint resolved -> run EXECUTING again (status stored)"
    )
    table = Table("resolved at", "runs", "snapshots", "restores", "latency median", "ratio to 10%")
    baseline = median_ms(result.fractions[0].latencies_s)
    for row in result.fractions:
        latency = median_ms(row.latencies_s)
        table.add(
            f"{row.fraction:.0%} of delay",
            len(row.latencies_s),
            sum(row.snapshots),
            sum(row.restores),
            format_ms(latency),
            format_ratio(latency, baseline),
        )
    emit(table.render())
    below = result.snapshots_below_delay()
    emit(
        f"snapshots below 100% of the delay: {below} (expected 0)"
        + ("" if below == 0 else "  <-- UNEXPECTED")
    )
    emit(
        "NOTE: the 200% row restores through the gateway double, which returns at once; "
        "the resume benchmark measures a real CRIU restore."
    )
