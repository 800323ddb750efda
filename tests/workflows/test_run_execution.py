"""RunExecutionWorkflow on the time-skipping server against the recording gateway double.

Snapshot delay: 5 s of workflow time. `env.sleep` skips workflow time, so
"before the delay" and "after the delay" are exact, not raced.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import CancelledError

from tests.workflows.conftest import Harness, assert_replays, new_id, seed_deployment, seed_run
from tests.workflows.gateway_double import CALL_WAIT_TIMEOUT_S
from vmflow.compute.models import InstanceState, SnapshotState
from vmflow.storage.db import session_scope
from vmflow.storage.models import (
    CheckpointType,
    TaskRun,
    TaskRunCheckpoint,
    TaskRunStatus,
    Waitpoint,
    WaitpointStatus,
)
from vmflow.storage.models import (
    WaitpointKind as DbWaitpointKind,
)
from workflows.contract import (
    QUERY_RUN_STATE,
    SEARCH_DEPLOYMENT_ID,
    SEARCH_INSTANCE_ID,
    SEARCH_RUN_ID,
    SEARCH_RUN_STATE,
    SIGNAL_RUNNER_FINISHED,
    SIGNAL_RUNNER_RESUMED,
    SIGNAL_RUNNER_STARTED,
    SIGNAL_SUSPEND_REQUESTED,
    SIGNAL_WAITPOINT_COMPLETED,
    UPDATE_COMPLETE_WAITPOINT,
    CompleteWaitpointResult,
    RunExecutionInput,
    RunExecutionResult,
    RunnerFinished,
    RunnerResumed,
    RunnerStarted,
    RunState,
    RunStateView,
    SuspendRequested,
    WaitpointCompleted,
    WaitpointKind,
    run_workflow_id,
    runner_id_for,
)
from workflows.run_execution import INSTANCE_CHECK_INTERVAL, RunExecutionWorkflow

DELAY = timedelta(milliseconds=5_000)


async def start_run(harness: Harness, **overrides: Any) -> tuple[str, WorkflowHandle[Any, Any]]:
    seeded = seed_deployment(harness.sessions)
    run_id = new_id("run")
    seed_run(harness.sessions, seeded.deployment_id, run_id)
    fields: dict[str, Any] = {
        "run_id": run_id,
        "deployment_id": seeded.deployment_id,
        "image": seeded.image,
        "snapshot_delay_ms": int(DELAY.total_seconds() * 1000),
        "snapshot_task_queue": harness.snapshot_task_queue,
        "trace_context": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    }
    fields.update(overrides)
    handle = await harness.client.start_workflow(
        RunExecutionWorkflow.run,
        RunExecutionInput(**fields),
        id=run_workflow_id(run_id),
        task_queue=harness.task_queue,
    )
    return run_id, handle


async def state_of(handle: WorkflowHandle[Any, Any]) -> RunStateView:
    return await handle.query(QUERY_RUN_STATE, result_type=RunStateView)


async def wait_for_state(handle: WorkflowHandle[Any, Any], state: RunState) -> RunStateView:
    """Query the run until it is in `state`.

    The double records a gateway call before the workflow has acted on its
    result, so a test that saw the call waits here for the state it leads to.
    """
    view = await state_of(handle)
    try:
        async with asyncio.timeout(CALL_WAIT_TIMEOUT_S):
            while view.state != state:
                await asyncio.sleep(0.02)
                view = await state_of(handle)
    except TimeoutError:
        raise AssertionError(f"run never reached {state}; it is {view}") from None
    return view


async def suspend(
    handle: WorkflowHandle[Any, Any], runner_id: str, waitpoint_id: str, **fields: Any
) -> None:
    message = SuspendRequested(
        runner_id=runner_id,
        waitpoint_id=waitpoint_id,
        kind=fields.pop("kind", WaitpointKind.TOKEN),
        execution_snapshot_id=f"exec-{waitpoint_id}",
        **fields,
    )
    await handle.signal(SIGNAL_SUSPEND_REQUESTED, message)


async def resolve(handle: WorkflowHandle[Any, Any], waitpoint_id: str, output: Any = None) -> None:
    await handle.signal(SIGNAL_WAITPOINT_COMPLETED, WaitpointCompleted(waitpoint_id, output))


async def finish(
    handle: WorkflowHandle[Any, Any], runner_id: str, output: Any = "done"
) -> RunExecutionResult:
    await handle.signal(SIGNAL_RUNNER_FINISHED, RunnerFinished(runner_id, True, output))
    return await handle.result()


async def started_runner(harness: Harness, handle: WorkflowHandle[Any, Any], run_id: str) -> str:
    """Wait for the provision and report the first runner started; return its id."""
    await harness.gateway.wait_for("instances.create")
    runner_id = runner_id_for(run_id, 1)
    await handle.signal(SIGNAL_RUNNER_STARTED, RunnerStarted(runner_id))
    return runner_id


async def suspended_run(
    harness: Harness, waitpoint_id: str
) -> tuple[str, WorkflowHandle[Any, Any]]:
    """Start a run, suspend it past the delay, and wait until its instance is released."""
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)
    await suspend(handle, runner, waitpoint_id)
    await harness.env.sleep(DELAY + timedelta(seconds=1))
    await harness.gateway.wait_for("instances.delete")
    await wait_for_state(handle, RunState.SUSPENDED)
    return run_id, handle


async def test_run_waitpoint_before_delay_takes_no_snapshot(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)

    await suspend(handle, runner, "wp-1")
    await harness.env.sleep(DELAY - timedelta(seconds=2))
    await resolve(handle, "wp-1", {"approved": True})
    await harness.env.sleep(DELAY * 2)
    result = await finish(handle, runner, {"sum": 3})

    assert result.state == RunState.COMPLETED
    assert result.output == {"sum": 3}
    assert harness.gateway.calls_of("instances.snapshot") == []
    assert harness.gateway.calls_of("snapshots.restore") == []
    deleted = harness.gateway.calls_of("instances.delete")
    created = harness.gateway.calls_of("instances.create")
    assert [call.target for call in deleted] == [created[0].target]
    with session_scope(harness.sessions) as session:
        run = session.get(TaskRun, run_id)
        assert run is not None
        assert run.status == TaskRunStatus.COMPLETED
        assert run.output == {"sum": 3}
        assert run.instance_id is None
    await assert_replays(handle, "run_in_place")


async def test_run_provision_env_and_digest(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)
    await finish(handle, runner)

    create = harness.gateway.calls_of("instances.create")[0]
    env = create.body["env"]
    assert env["VMFLOW_RUN_ID"] == run_id
    assert env["VMFLOW_RUNNER_ID"] == f"{run_id}-r1"
    assert env["VMFLOW_WORKLOAD_URL"] == "http://127.0.0.1:9/vmflow-api"
    assert env["VMFLOW_WORKLOAD_TOKEN"].startswith(f"token-{run_id}-r1-")
    assert "@sha256" not in create.body["image"]
    assert create.body["name"] == f"{run_id}-r1"


async def test_run_long_wait_snapshots_and_restores(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await suspended_run(harness, "wp-long")
    view = await state_of(handle)
    assert view.state == RunState.SUSPENDED
    assert view.instance_id is None

    snapshot_calls = harness.gateway.calls_of("instances.snapshot")
    assert len(snapshot_calls) == 1
    callback = snapshot_calls[0].body["callback"]
    assert callback["url"] == "http://127.0.0.1:9/vmflow-api/api/v1/compute/callbacks/snapshot"
    assert callback["metadata"]["run_id"] == run_id
    assert callback["metadata"]["runner_id"] == f"{run_id}-r1"
    snapshot_id = view.snapshot_id
    assert snapshot_id is not None
    with session_scope(harness.sessions) as session:
        checkpoints = session.scalars(
            select(TaskRunCheckpoint).where(TaskRunCheckpoint.run_id == run_id)
        ).all()
        assert [(c.type, c.location) for c in checkpoints] == [
            (CheckpointType.COMPUTE, snapshot_id)
        ]
        assert checkpoints[0].waitpoint_id == "wp-long"
        run = session.get(TaskRun, run_id)
        assert run is not None
        assert run.status == TaskRunStatus.SUSPENDED

    await resolve(handle, "wp-long", "token value")
    restore = (await harness.gateway.wait_for("snapshots.restore"))[0]
    assert restore.target == snapshot_id
    assert restore.body["metadata"]["VMFLOW_RUNNER_ID"] == f"{run_id}-r2"
    assert restore.body["metadata"]["VMFLOW_WORKLOAD_TOKEN"].startswith(f"token-{run_id}-r2-")
    assert restore.body["name"] == f"{run_id}-r2"

    await handle.signal(SIGNAL_RUNNER_RESUMED, RunnerResumed(f"{run_id}-r2", "wp-long"))
    result = await finish(handle, f"{run_id}-r2")
    assert result.state == RunState.COMPLETED
    assert result.snapshot_count == 1
    assert result.restore_count == 1
    assert len(harness.gateway.calls_of("instances.snapshot")) == 1
    # Both the snapshotted instance and the restored one are deleted, then the snapshot.
    assert len(harness.gateway.calls_of("instances.delete")) == 2
    assert [c.target for c in harness.gateway.calls_of("snapshots.delete")] == [snapshot_id]
    await assert_replays(handle, "run_snapshot_restore")


async def test_run_restore_sends_current_api_url(harness: Harness) -> None:
    # A restarted worker has no workflow cache (see test_run_worker_restart_during_delay).
    harness.max_cached_workflows = 0
    await harness.start_workers()
    run_id, handle = await suspended_run(harness, "wp-moved")
    provisioned = harness.gateway.calls_of("instances.create")[0]
    assert provisioned.body["env"]["VMFLOW_WORKLOAD_URL"] == "http://127.0.0.1:9/vmflow-api"

    # The API moves while the run is suspended; the worker restarts with its new URL.
    await harness.stop_workers()
    harness.api_url = "http://127.0.0.1:10/moved-api"
    await harness.start_workers()
    await resolve(handle, "wp-moved")

    restore = (await harness.gateway.wait_for("snapshots.restore"))[0]
    assert restore.body["metadata"]["VMFLOW_WORKLOAD_URL"] == "http://127.0.0.1:10/moved-api"
    result = await finish(handle, f"{run_id}-r2")
    assert result.state == RunState.COMPLETED


async def test_run_fails_when_instance_exits(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await start_run(harness)
    await started_runner(harness, handle, run_id)
    instance_id = harness.gateway.calls_of("instances.create")[0].target
    assert instance_id is not None

    # The sandboxed process is SIGKILLed: no runner message ever arrives.
    harness.gateway.exit_instance(instance_id, 137, "step 1\nKilled\n")
    await harness.env.sleep(INSTANCE_CHECK_INTERVAL + timedelta(seconds=1))
    await harness.gateway.wait_for("instances.delete")
    result = await handle.result()

    assert result.state == RunState.FAILED
    assert result.error is not None
    assert result.error["name"] == "InstanceExited"
    assert result.error["exit_code"] == 137
    assert result.error["log_tail"] == "step 1\nKilled\n"
    assert "exit code 137" in result.error["message"]
    assert [c.target for c in harness.gateway.calls_of("instances.get")] == [instance_id]
    assert [c.target for c in harness.gateway.calls_of("instances.delete")] == [instance_id]
    with session_scope(harness.sessions) as session:
        run = session.get(TaskRun, run_id)
        assert run is not None
        assert run.status == TaskRunStatus.FAILED
        assert run.instance_id is None
    await assert_replays(handle, "run_instance_exited")


async def test_run_fails_when_instance_vanishes_in_place(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await start_run(harness, snapshots_enabled=False)
    runner = await started_runner(harness, handle, run_id)
    instance_id = harness.gateway.calls_of("instances.create")[0].target
    assert instance_id is not None
    await suspend(handle, runner, "wp-in-place")
    await harness.env.sleep(INSTANCE_CHECK_INTERVAL * 3)
    assert (await state_of(handle)).state == RunState.SUSPENDING

    # The gateway lost the instance while the task waited in place.
    del harness.gateway.instance_states[instance_id]
    await harness.env.sleep(INSTANCE_CHECK_INTERVAL + timedelta(seconds=1))
    await harness.gateway.wait_for("instances.delete")
    result = await handle.result()

    assert result.state == RunState.FAILED
    assert result.error is not None
    assert result.error["name"] == "InstanceExited"
    assert result.error["exit_code"] is None
    assert "is gone" in result.error["message"]
    assert len(harness.gateway.calls_of("instances.get")) >= 3
    assert harness.gateway.calls_of("instances.snapshot") == []


async def test_run_second_suspend_replaces_first(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)

    await suspend(handle, runner, "wp-first")
    await harness.env.sleep(DELAY - timedelta(seconds=1))
    await suspend(handle, runner, "wp-second")
    # Past the first request's delay but not the second's.
    await harness.env.sleep(timedelta(seconds=3))
    view = await state_of(handle)
    assert view.waitpoint_id == "wp-second"
    assert view.state == RunState.SUSPENDING
    assert harness.gateway.calls_of("instances.snapshot") == []

    await harness.env.sleep(timedelta(seconds=3))
    await harness.gateway.wait_for("instances.delete")
    with session_scope(harness.sessions) as session:
        checkpoint = session.scalars(
            select(TaskRunCheckpoint).where(TaskRunCheckpoint.run_id == run_id)
        ).one()
        assert checkpoint.waitpoint_id == "wp-second"

    # The replaced waitpoint resolving changes nothing; the current one restores.
    await resolve(handle, "wp-first")
    assert (await state_of(handle)).state == RunState.SUSPENDED
    await resolve(handle, "wp-second")
    await harness.gateway.wait_for("snapshots.restore")
    result = await finish(handle, f"{run_id}-r2")
    assert result.state == RunState.COMPLETED
    assert len(harness.gateway.calls_of("instances.snapshot")) == 1
    assert len(harness.gateway.calls_of("snapshots.restore")) == 1


async def test_run_stale_runner_changes_nothing(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await suspended_run(harness, "wp-stale")
    await resolve(handle, "wp-stale")
    await harness.gateway.wait_for("snapshots.restore")
    old_runner, new_runner = f"{run_id}-r1", f"{run_id}-r2"

    # The old runner's messages: a suspend and a finish, both ignored.
    await suspend(handle, old_runner, "wp-ghost")
    await handle.signal(SIGNAL_RUNNER_FINISHED, RunnerFinished(old_runner, False, error={"x": 1}))
    await harness.env.sleep(DELAY * 2)
    view = await state_of(handle)
    assert view.state == RunState.EXECUTING
    assert view.runner_id == new_runner
    assert view.waitpoint_id is None
    assert len(harness.gateway.calls_of("instances.snapshot")) == 1

    result = await finish(handle, new_runner, "from r2")
    assert result.state == RunState.COMPLETED
    assert result.output == "from r2"
    await assert_replays(handle, "run_stale_runner")


async def test_run_resolution_during_snapshot_restores_after(harness: Harness) -> None:
    await harness.start_workers()
    harness.gateway.hold_callbacks = True
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)

    await suspend(handle, runner, "wp-race")
    await harness.env.sleep(DELAY + timedelta(seconds=1))
    await harness.gateway.wait_until(
        lambda: len(harness.gateway.held_callbacks) == 1, "the snapshot callback is held"
    )
    assert (await state_of(handle)).state == RunState.SNAPSHOTTING
    await resolve(handle, "wp-race", 42)

    await harness.gateway.release_callbacks()
    # No further message is needed: the resolved waitpoint restores at once.
    restore = (await harness.gateway.wait_for("snapshots.restore"))[0]
    assert restore.body["metadata"]["VMFLOW_RUNNER_ID"] == f"{run_id}-r2"
    result = await finish(handle, f"{run_id}-r2")
    assert result.snapshot_count == 1
    assert result.restore_count == 1


async def test_run_failed_snapshot_keeps_instance(harness: Harness) -> None:
    await harness.start_workers()
    harness.gateway.snapshot_mode = "failed"
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)
    instance_id = harness.gateway.calls_of("instances.create")[0].target

    await suspend(handle, runner, "wp-fail")
    await harness.env.sleep(DELAY + timedelta(seconds=1))
    await harness.gateway.wait_for("instances.snapshot")
    view = await wait_for_state(handle, RunState.EXECUTING)
    assert view.instance_id == instance_id
    assert view.snapshot_id is None
    assert harness.gateway.calls_of("instances.delete") == []

    await resolve(handle, "wp-fail")
    result = await finish(handle, runner)
    assert result.state == RunState.COMPLETED
    assert result.snapshot_count == 0
    assert harness.gateway.calls_of("snapshots.restore") == []
    assert [c.target for c in harness.gateway.calls_of("instances.delete")] == [instance_id]
    with session_scope(harness.sessions) as session:
        count = session.scalars(
            select(TaskRunCheckpoint).where(TaskRunCheckpoint.run_id == run_id)
        ).all()
        assert count == []
    await assert_replays(handle, "run_failed_snapshot")


async def test_run_rejected_snapshot_is_not_retried(harness: Harness) -> None:
    await harness.start_workers()
    harness.gateway.snapshot_mode = "rejected"
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)

    await suspend(handle, runner, "wp-409")
    await harness.env.sleep(DELAY + timedelta(seconds=1))
    await harness.gateway.wait_for("instances.snapshot")
    await harness.env.sleep(timedelta(minutes=5))
    assert (await state_of(handle)).state == RunState.EXECUTING
    # A 409 is a validation error: one request, no retries.
    assert len(harness.gateway.calls_of("instances.snapshot")) == 1

    await resolve(handle, "wp-409")
    result = await finish(handle, runner)
    assert result.state == RunState.COMPLETED


@pytest.mark.parametrize("snapshot_id_in", ["accepted", "instance"])
async def test_run_lost_callback_is_reconciled(harness: Harness, snapshot_id_in: str) -> None:
    await harness.start_workers()
    harness.gateway.snapshot_mode = "lost"
    harness.gateway.snapshot_id_in = snapshot_id_in
    run_id, handle = await start_run(harness, snapshot_callback_timeout_s=60.0)
    runner = await started_runner(harness, handle, run_id)

    await suspend(handle, runner, "wp-lost")
    await harness.env.sleep(DELAY + timedelta(seconds=1))
    await harness.gateway.wait_for("instances.snapshot")
    await harness.env.sleep(timedelta(seconds=61))
    await harness.gateway.wait_for("instances.get")
    await harness.gateway.wait_for("snapshots.get")
    await harness.gateway.wait_for("instances.delete")

    view = await wait_for_state(handle, RunState.SUSPENDED)
    assert view.state == RunState.SUSPENDED
    snapshot_id = view.snapshot_id
    assert snapshot_id is not None
    assert (
        snapshot_id
        == harness.gateway.instance_snapshots[
            harness.gateway.calls_of("instances.create")[0].target or ""
        ]
    )

    await resolve(handle, "wp-lost")
    restore = (await harness.gateway.wait_for("snapshots.restore"))[0]
    assert restore.target == snapshot_id
    result = await finish(handle, f"{run_id}-r2")
    assert result.state == RunState.COMPLETED


async def test_run_vanished_snapshot_continues_in_place(harness: Harness) -> None:
    await harness.start_workers()
    harness.gateway.snapshot_mode = "vanished"
    run_id, handle = await start_run(harness, snapshot_callback_timeout_s=60.0)
    runner = await started_runner(harness, handle, run_id)
    instance_id = harness.gateway.calls_of("instances.create")[0].target

    await suspend(handle, runner, "wp-vanished")
    await harness.env.sleep(DELAY + timedelta(seconds=1))
    await harness.gateway.wait_for("instances.snapshot")
    await harness.env.sleep(timedelta(seconds=61))
    await harness.gateway.wait_for("instances.get")

    view = await wait_for_state(handle, RunState.EXECUTING)
    assert view.instance_id == instance_id
    assert harness.gateway.calls_of("instances.delete") == []
    await resolve(handle, "wp-vanished")
    result = await finish(handle, runner)
    assert result.state == RunState.COMPLETED
    assert harness.gateway.calls_of("snapshots.restore") == []


async def test_run_duration_waitpoint_uses_timer(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)
    with session_scope(harness.sessions) as session:
        session.add(Waitpoint(id=f"wp-{run_id}", run_id=run_id, kind=DbWaitpointKind.DURATION))

    now = await harness.env.get_current_time()
    await suspend(
        handle,
        runner,
        f"wp-{run_id}",
        kind=WaitpointKind.DURATION,
        resume_at=now + timedelta(minutes=10),
    )
    await harness.env.sleep(DELAY + timedelta(seconds=1))
    await harness.gateway.wait_for("instances.delete")
    await wait_for_state(handle, RunState.SUSPENDED)

    # No signal: the workflow's own timer completes the waitpoint and restores.
    await harness.env.sleep(timedelta(minutes=10))
    await harness.gateway.wait_for("snapshots.restore")
    with session_scope(harness.sessions) as session:
        waitpoint = session.get(Waitpoint, f"wp-{run_id}")
        assert waitpoint is not None
        assert waitpoint.status == WaitpointStatus.COMPLETED
    result = await finish(handle, f"{run_id}-r2")
    assert result.state == RunState.COMPLETED
    await assert_replays(handle, "run_duration_waitpoint")


async def test_run_update_reports_duplicate_completion(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)
    await suspend(handle, runner, "wp-update")

    first = await handle.execute_update(
        UPDATE_COMPLETE_WAITPOINT,
        WaitpointCompleted("wp-update", "first"),
        result_type=CompleteWaitpointResult,
    )
    second = await handle.execute_update(
        UPDATE_COMPLETE_WAITPOINT,
        WaitpointCompleted("wp-update", "second"),
        result_type=CompleteWaitpointResult,
    )
    assert first.accepted is True
    assert second.accepted is False
    result = await finish(handle, runner)
    assert result.state == RunState.COMPLETED
    assert harness.gateway.calls_of("instances.snapshot") == []


async def test_run_dispatch_limit_caps_snapshots(harness: Harness) -> None:
    limit = harness.snapshot_dispatch_limit
    total = 20
    await harness.start_workers()
    # Each request waits until `limit` are in flight (or all have started), so
    # requests pile up at the gateway as far as the worker lets them.
    harness.gateway.snapshot_gate = lambda gateway: (
        gateway.snapshots_in_flight >= limit or gateway.snapshot_requests_started >= total
    )
    runs = [await start_run(harness) for _ in range(total)]
    await harness.gateway.wait_for("instances.create", total)
    for run_id, handle in runs:
        runner = runner_id_for(run_id, 1)
        await handle.signal(SIGNAL_RUNNER_STARTED, RunnerStarted(runner))
        await suspend(handle, runner, f"wp-{run_id}")

    await harness.env.sleep(DELAY + timedelta(seconds=1))
    await harness.gateway.wait_for("instances.delete", total)
    assert len(harness.gateway.calls_of("instances.snapshot")) == total
    assert harness.gateway.max_snapshots_in_flight == limit

    for run_id, handle in runs:
        await resolve(handle, f"wp-{run_id}")
    await harness.gateway.wait_for("snapshots.restore", total)
    # One result at a time: the test server counts time-skipping locks per call,
    # and concurrent waits on results leave time locked for the next test.
    states = {(await finish(handle, f"{run_id}-r2")).state for run_id, handle in runs}
    assert states == {RunState.COMPLETED}


async def test_run_worker_restart_during_delay(harness: Harness) -> None:
    # NOTE: the time-skipping server keeps routing a workflow's tasks to the sticky
    # queue of a worker that shut down, so these workers run without a cache, as
    # a restarted process has none.
    harness.max_cached_workflows = 0
    await harness.start_workers()
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)
    await suspend(handle, runner, "wp-restart")
    await harness.env.sleep(DELAY - timedelta(seconds=3))
    assert (await state_of(handle)).state == RunState.SUSPENDING

    await harness.stop_workers()
    await harness.start_workers()

    await harness.env.sleep(timedelta(seconds=4))
    await harness.gateway.wait_for("instances.delete")
    assert len(harness.gateway.calls_of("instances.snapshot")) == 1
    await resolve(handle, "wp-restart")
    await harness.gateway.wait_for("snapshots.restore")
    result = await finish(handle, f"{run_id}-r2")
    assert result.state == RunState.COMPLETED


async def test_run_timeout_releases_snapshot(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await start_run(harness, max_duration_s=60.0)
    runner = await started_runner(harness, handle, run_id)
    await suspend(handle, runner, "wp-never")
    await harness.env.sleep(DELAY + timedelta(seconds=1))
    await harness.gateway.wait_for("instances.delete")
    snapshot_id = (await wait_for_state(handle, RunState.SUSPENDED)).snapshot_id

    result = await handle.result()
    assert result.state == RunState.TIMED_OUT
    assert [c.target for c in harness.gateway.calls_of("snapshots.delete")] == [snapshot_id]
    with session_scope(harness.sessions) as session:
        run = session.get(TaskRun, run_id)
        assert run is not None
        assert run.status == TaskRunStatus.TIMED_OUT


async def test_run_cancel_releases_instance(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await start_run(harness)
    await started_runner(harness, handle, run_id)
    instance_id = harness.gateway.calls_of("instances.create")[0].target

    await handle.cancel()
    await harness.gateway.wait_for("instances.delete")
    assert [c.target for c in harness.gateway.calls_of("instances.delete")] == [instance_id]
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert isinstance(failure.value.cause, CancelledError)
    with session_scope(harness.sessions) as session:
        run = session.get(TaskRun, run_id)
        assert run is not None
        assert run.status == TaskRunStatus.CANCELED


async def wait_for_timer(handle: WorkflowHandle[Any, Any], summary_part: str) -> None:
    """Wait until the run's history has started a timer whose summary contains `summary_part`."""

    async def started() -> bool:
        history = await handle.fetch_history()
        for event in history.events:
            if event.HasField("timer_started_event_attributes") and event.HasField("user_metadata"):
                if summary_part in event.user_metadata.summary.data.decode():
                    return True
        return False

    try:
        async with asyncio.timeout(CALL_WAIT_TIMEOUT_S):
            found = await started()
            while not found:
                await asyncio.sleep(0.02)
                found = await started()
    except TimeoutError:
        raise AssertionError(f"the run started no timer named like {summary_part!r}") from None


async def test_run_cancel_during_snapshot_deletes_both(harness: Harness) -> None:
    await harness.start_workers()
    harness.gateway.hold_callbacks = True
    run_id, handle = await start_run(harness)
    runner = await started_runner(harness, handle, run_id)
    instance_id = harness.gateway.calls_of("instances.create")[0].target
    assert instance_id is not None
    await suspend(handle, runner, "wp-cancel")
    await harness.env.sleep(DELAY + timedelta(seconds=1))
    await harness.gateway.wait_until(
        lambda: len(harness.gateway.held_callbacks) == 1, "the snapshot callback is held"
    )

    # The run stops while the gateway is still snapshotting its instance.
    await handle.cancel()
    await wait_for_timer(handle, "settle snapshot")
    assert harness.gateway.calls_of("instances.delete") == []
    await harness.gateway.release_callbacks()

    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert isinstance(failure.value.cause, CancelledError)
    snapshot_id = harness.gateway.instance_snapshots[instance_id]
    assert [c.target for c in harness.gateway.calls_of("snapshots.delete")] == [snapshot_id]
    assert harness.gateway.snapshot_states[snapshot_id] == SnapshotState.DELETED
    assert [c.target for c in harness.gateway.calls_of("instances.delete")] == [instance_id]
    assert harness.gateway.instance_states[instance_id] == InstanceState.DELETED
    with session_scope(harness.sessions) as session:
        run = session.get(TaskRun, run_id)
        assert run is not None
        assert run.status == TaskRunStatus.CANCELED
    await assert_replays(handle, "run_cancel_during_snapshot")


async def test_run_timeout_during_lost_snapshot_reconciles(harness: Harness) -> None:
    await harness.start_workers()
    harness.gateway.snapshot_mode = "lost"
    run_id, handle = await start_run(
        harness, max_duration_s=30.0, snapshot_callback_timeout_s=600.0
    )
    runner = await started_runner(harness, handle, run_id)
    instance_id = harness.gateway.calls_of("instances.create")[0].target
    assert instance_id is not None
    await suspend(handle, runner, "wp-timeout")

    # The run times out waiting for the callback, which never arrives; the gateway
    # reports the snapshot completed when the settle wait ends.
    result = await handle.result()

    assert result.state == RunState.TIMED_OUT
    snapshot_id = harness.gateway.instance_snapshots[instance_id]
    assert [c.target for c in harness.gateway.calls_of("snapshots.delete")] == [snapshot_id]
    assert [c.target for c in harness.gateway.calls_of("instances.delete")] == [instance_id]
    await assert_replays(handle, "run_timeout_during_snapshot")


async def test_run_continues_as_new_across_cycles(harness: Harness) -> None:
    await harness.start_workers()
    run_id, handle = await start_run(harness, continue_as_new_after_events=60)
    runner = await started_runner(harness, handle, run_id)
    first_run_id = (await handle.describe()).run_id

    for cycle in range(1, 4):
        await suspend(handle, runner, f"wp-{cycle}")
        await harness.env.sleep(DELAY + timedelta(seconds=1))
        await harness.gateway.wait_for("instances.delete", cycle)
        await resolve(handle, f"wp-{cycle}")
        await harness.gateway.wait_for("snapshots.restore", cycle)
        runner = runner_id_for(run_id, cycle + 1)

    latest = harness.client.get_workflow_handle_for(
        RunExecutionWorkflow.run, run_workflow_id(run_id)
    )
    result = await finish(latest, runner)
    assert result.state == RunState.COMPLETED
    assert result.snapshot_count == 3
    assert result.restore_count == 3
    assert (await latest.describe()).run_id != first_run_id


async def test_run_logs_wide_line_per_instance(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="activities.gateway")
    await harness.start_workers()
    run_id, handle = await suspended_run(harness, "wp-logged")
    await resolve(handle, "wp-logged")
    await harness.gateway.wait_for("snapshots.restore")
    await finish(handle, f"{run_id}-r2")

    messages = [record.getMessage() for record in caplog.records]
    lines = [message for message in messages if message.startswith("instance created")]
    assert len(lines) == 2
    restored = json.loads(lines[1].removeprefix("instance created "))
    assert restored["runner_id"] == f"{run_id}-r2"
    assert (
        restored["restored_from_snapshot_id"]
        == harness.gateway.calls_of("snapshots.restore")[0].target
    )
    assert restored["gateway_timing"] == {"restore_ms": 7.0}
    fields = json.loads(lines[0].removeprefix("instance created "))
    assert fields["restored_from_snapshot_id"] is None
    assert fields["run_id"] == run_id
    assert fields["runner_id"] == f"{run_id}-r1"
    assert fields["instance_id"] == harness.gateway.calls_of("instances.create")[0].target
    assert fields["workflow_id"] == run_workflow_id(run_id)
    assert fields["gateway_timing"] == {"boot_ms": 12.5}
    assert fields["end_ns"] >= fields["start_ns"]


async def test_run_is_readable_in_the_ui(dev_harness: Harness) -> None:
    await dev_harness.start_workers()
    run_id, handle = await start_run(dev_harness)
    runner = await started_runner(dev_harness, handle, run_id)
    running = await handle.describe()
    instance_id = dev_harness.gateway.calls_of("instances.create")[0].target
    assert running.typed_search_attributes.get(SEARCH_RUN_ID) == run_id
    await finish(handle, runner)

    description = await handle.describe()
    attributes = description.typed_search_attributes
    assert attributes.get(SEARCH_RUN_ID) == run_id
    assert attributes.get(SEARCH_RUN_STATE) == "COMPLETED"
    assert attributes.get(SEARCH_DEPLOYMENT_ID) is not None
    assert attributes.get(SEARCH_INSTANCE_ID) is None
    assert instance_id is not None

    history = await handle.fetch_history()
    summaries = [
        event.user_metadata.summary.data.decode()
        for event in history.events
        if event.HasField("user_metadata") and event.user_metadata.HasField("summary")
    ]
    assert any(summary.startswith('"provision ') for summary in summaries)
    assert any("release instance" in summary for summary in summaries)


async def test_run_rejected_provision_fails_run(harness: Harness) -> None:
    await harness.start_workers()
    harness.gateway.create_error_status = 422
    run_id, handle = await start_run(harness)

    result = await handle.result()

    assert result.state == RunState.FAILED
    assert result.error is not None
    assert result.error["name"] == "ProvisionFailed"
    assert "returned 422" in result.error["message"]
    # A 422 is a validation error: one request, no retries.
    assert len(harness.gateway.calls_of("instances.create")) == 1
    with session_scope(harness.sessions) as session:
        run = session.get(TaskRun, run_id)
        assert run is not None
        assert run.status == TaskRunStatus.FAILED


async def test_run_unavailable_gateway_is_retried(harness: Harness) -> None:
    await harness.start_workers()
    harness.gateway.create_error_status = 503
    run_id, handle = await start_run(harness)

    await harness.gateway.wait_for("instances.create", 2)
    harness.gateway.create_error_status = None
    await harness.gateway.wait_until(
        lambda: any(call.target for call in harness.gateway.calls_of("instances.create")),
        "an instance was created",
    )
    result = await finish(handle, runner_id_for(run_id, 1))
    assert result.state == RunState.COMPLETED
