"""RunExecutionWorkflow: one task run from provision to outcome, suspending through snapshots.

A run provisions an instance, follows its runner's messages, and when the
task waits at a waitpoint races a durable timer of `snapshot_delay_ms`
against the waitpoint. If the waitpoint resolves first, the runner goes on
in place. If the timer fires first, the instance is snapshotted, the
snapshot recorded as a COMPUTE checkpoint and the instance released. Once
the waitpoint resolves, the snapshot is restored with a new runner id.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.database import (
        CheckpointInput,
        DatabaseActivities,
        RunStatusInput,
        WaitpointCompletionInput,
    )
    from activities.gateway import (
        DeleteInstanceInput,
        DeleteSnapshotInput,
        GatewayActivities,
        InstanceStateInput,
        ProvisionInput,
        RestoreInput,
        SnapshotRequestInput,
    )
    from activities.spans import ComputeSpanInput, SpanActivities
    from workflows.contract import (
        METADATA_SNAPSHOT_REQUEST_ID,
        QUERY_RUN_STATE,
        RUN_EXECUTION_WORKFLOW,
        SEARCH_DEPLOYMENT_ID,
        SEARCH_INSTANCE_ID,
        SEARCH_RUN_ID,
        SEARCH_RUN_STATE,
        SIGNAL_RUNNER_FINISHED,
        SIGNAL_RUNNER_RESUMED,
        SIGNAL_RUNNER_STARTED,
        SIGNAL_SNAPSHOT_FINISHED,
        SIGNAL_SUSPEND_REQUESTED,
        SIGNAL_WAITPOINT_COMPLETED,
        UPDATE_COMPLETE_WAITPOINT,
        CompleteWaitpointResult,
        RunCarryOver,
        RunExecutionInput,
        RunExecutionResult,
        RunnerFinished,
        RunnerResumed,
        RunnerStarted,
        RunState,
        RunStateView,
        SnapshotFinished,
        SnapshotStatus,
        SuspendRequested,
        WaitpointCompleted,
        WaitpointKind,
        runner_id_for,
    )
    from workflows.options import (
        DATABASE_RETRY,
        DATABASE_TIMEOUT,
        GATEWAY_CALL_TIMEOUT,
        GATEWAY_RETRY,
        RESTORE_TIMEOUT,
        SNAPSHOT_QUEUE_TIMEOUT,
        SPAN_RETRY,
    )

# How many times the workflow checks with the gateway on a snapshot whose callback is late.
MAX_SNAPSHOT_CHECKS = 5
# Completed waitpoint ids kept across continue-as-new, newest last.
MAX_CARRIED_WAITPOINTS = 100
# How often the workflow checks through the gateway that a running task's instance is
# alive, so a run whose process died fails instead of waiting forever.
INSTANCE_CHECK_INTERVAL = timedelta(seconds=30)
# Bytes of an exited instance's output that the run's error keeps.
INSTANCE_LOG_TAIL_BYTES = 2_048

# Patch ids (`workflow.patched`): histories recorded before a change replay without it.
PATCH_INSTANCE_CHECK = "check-instance-while-waiting-for-runner"
PATCH_SETTLE_SNAPSHOT = "settle-snapshot-in-flight-before-release"
# How long a stopped run waits for the result of a snapshot it requested before
# it stopped. The gateway rejects deleting an instance while it is snapshotting.
SNAPSHOT_SETTLE_TIMEOUT = timedelta(minutes=5)

# Instance states in which the instance still runs the task's process.
_LIVE_INSTANCE_STATES = frozenset({"starting", "running"})
# Instance states in which the task's process may still send runner messages.
_ALIVE_INSTANCE_STATES = _LIVE_INSTANCE_STATES | {"snapshotting"}


class RunStoppedError(Exception):
    """The run was canceled or timed out; the run ends in `state` after releasing compute."""

    def __init__(self, state: RunState) -> None:
        super().__init__(state.value)
        self.state = state


class RunFailedError(Exception):
    """A step the run cannot continue without failed; the run ends FAILED with this error."""

    def __init__(self, name: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.message = message
        # Extra fields of the run's error, next to `name` and `message`.
        self.details = details or {}


@dataclasses.dataclass(frozen=True)
class _SnapshotInFlight:
    """A snapshot request the gateway accepted and whose result the run has not taken."""

    request_id: str
    instance_id: str
    # The snapshot's id when the gateway named it in its 202 response.
    snapshot_id: str | None


def _db_status(state: RunState) -> str:
    # The database has no SNAPSHOTTING status; a snapshot is part of suspending.
    return "SUSPENDING" if state == RunState.SNAPSHOTTING else state.value


def _ns(instant: Any) -> int:
    return int(instant.timestamp() * 1_000_000_000)


@workflow.defn(name=RUN_EXECUTION_WORKFLOW)
class RunExecutionWorkflow:
    """Drives one run through the gateway; see `workflows.contract` for its messages."""

    @workflow.init
    def __init__(self, input: RunExecutionInput) -> None:
        self._input = input
        self._run_id = input.run_id
        self._state = RunState.PROVISIONING
        self._generation = 0
        self._runner_id: str | None = None
        self._instance_id: str | None = None
        self._snapshot_id: str | None = None
        self._started_at = workflow.now()
        self._pending: SuspendRequested | None = None
        # Counts accepted suspend requests, so a wait can tell that a newer one arrived.
        self._suspend_seq = 0
        self._completed: dict[str, WaitpointCompleted] = {}
        self._snapshot_results: dict[str, SnapshotFinished] = {}
        self._finished: RunnerFinished | None = None
        self._snapshot_count = 0
        self._restore_count = 0
        self._snapshot_requests = 0
        # Set when the run is canceled or times out; the body stops at its next wait.
        self._stop_state: RunState | None = None
        self._snapshot_in_flight: _SnapshotInFlight | None = None

        carried = input.carried
        if carried is not None:
            self._state = carried.state
            self._generation = carried.generation
            self._runner_id = carried.runner_id
            self._instance_id = carried.instance_id
            self._snapshot_id = carried.snapshot_id
            self._started_at = carried.started_at
            self._pending = carried.pending_suspend
            self._completed = dict(carried.completed_waitpoints)
            self._snapshot_count = carried.snapshot_count
            self._restore_count = carried.restore_count
            self._snapshot_requests = carried.snapshot_requests

    # -- messages ---------------------------------------------------------------

    def _is_current(self, runner_id: str, message: str) -> bool:
        if runner_id == self._runner_id:
            return True
        workflow.logger.warning(
            "run %s ignored %s from runner %s: the current runner is %s",
            self._run_id,
            message,
            runner_id,
            self._runner_id,
        )
        return False

    @workflow.signal(name=SIGNAL_RUNNER_STARTED)
    def runner_started(self, message: RunnerStarted) -> None:
        """Note that the current runner loaded the task."""
        if self._is_current(message.runner_id, SIGNAL_RUNNER_STARTED):
            workflow.logger.info("run %s: runner %s started", self._run_id, message.runner_id)

    @workflow.signal(name=SIGNAL_SUSPEND_REQUESTED)
    def suspend_requested(self, message: SuspendRequested) -> None:
        """Start (or replace) a pending suspend of the current runner."""
        if not self._is_current(message.runner_id, SIGNAL_SUSPEND_REQUESTED):
            return
        if self._state in (RunState.SNAPSHOTTING, RunState.SUSPENDED) or self._state.is_final:
            # The current runner is frozen in a snapshot or gone, so this is a late duplicate.
            # A restore makes the restored runner current before it can send anything.
            workflow.logger.warning(
                "run %s ignored a suspend at waitpoint %s while %s",
                self._run_id,
                message.waitpoint_id,
                self._state,
            )
            return
        if self._pending is not None and self._pending.waitpoint_id == message.waitpoint_id:
            return
        self._pending = message
        self._suspend_seq += 1

    @workflow.signal(name=SIGNAL_WAITPOINT_COMPLETED)
    def waitpoint_completed(self, message: WaitpointCompleted) -> None:
        """Record that a waitpoint resolved; the first completion of a waitpoint wins."""
        self._completed.setdefault(message.waitpoint_id, message)

    @workflow.update(name=UPDATE_COMPLETE_WAITPOINT)
    def complete_waitpoint(self, message: WaitpointCompleted) -> CompleteWaitpointResult:
        """Record that a waitpoint resolved and return whether this call was the first."""
        accepted = message.waitpoint_id not in self._completed
        self._completed.setdefault(message.waitpoint_id, message)
        return CompleteWaitpointResult(accepted=accepted, state=self._state)

    @complete_waitpoint.validator
    def _validate_complete_waitpoint(self, message: WaitpointCompleted) -> None:
        if not message.waitpoint_id:
            raise ValueError("waitpoint_id is empty; pass the id of the waitpoint to complete")

    @workflow.signal(name=SIGNAL_SNAPSHOT_FINISHED)
    def snapshot_finished(self, message: SnapshotFinished) -> None:
        """Record the gateway's snapshot callback under its snapshot request id."""
        request_id = message.metadata.get(METADATA_SNAPSHOT_REQUEST_ID)
        if not request_id:
            workflow.logger.warning(
                "run %s ignored a snapshot callback for instance %s without %s in its metadata",
                self._run_id,
                message.instance_id,
                METADATA_SNAPSHOT_REQUEST_ID,
            )
            return
        self._snapshot_results.setdefault(request_id, message)

    @workflow.signal(name=SIGNAL_RUNNER_RESUMED)
    def runner_resumed(self, message: RunnerResumed) -> None:
        """Note that the current runner continues after a waitpoint."""
        if self._is_current(message.runner_id, SIGNAL_RUNNER_RESUMED):
            workflow.logger.info(
                "run %s: runner %s resumed after waitpoint %s",
                self._run_id,
                message.runner_id,
                message.waitpoint_id,
            )

    @workflow.signal(name=SIGNAL_RUNNER_FINISHED)
    def runner_finished(self, message: RunnerFinished) -> None:
        """Record the task's outcome from the current runner; the first one counts."""
        if self._is_current(message.runner_id, SIGNAL_RUNNER_FINISHED) and self._finished is None:
            self._finished = message

    @workflow.query(name=QUERY_RUN_STATE)
    def run_state(self) -> RunStateView:
        """Return the run's state, current runner, instance, snapshot and waitpoint."""
        return RunStateView(
            run_id=self._run_id,
            state=self._state,
            runner_id=self._runner_id,
            instance_id=self._instance_id,
            snapshot_id=self._snapshot_id,
            waitpoint_id=self._pending.waitpoint_id if self._pending else None,
            generation=self._generation,
            snapshot_count=self._snapshot_count,
            restore_count=self._restore_count,
        )

    # -- main flow --------------------------------------------------------------

    @workflow.run
    async def run(self, input: RunExecutionInput) -> RunExecutionResult:
        """Run the task to its outcome, within `max_duration_s` of the first start."""
        workflow.upsert_search_attributes(
            [
                SEARCH_RUN_ID.value_set(input.run_id),
                SEARCH_DEPLOYMENT_ID.value_set(input.deployment_id),
            ]
        )
        self._publish_state()

        # The body is never cancelled: a cancel or a timeout sets `_stop_state`,
        # and the body stops at its next wait, after any activity in flight
        # completes, so no instance or database write is left half done.
        body = asyncio.create_task(self._drive())
        try:
            if input.max_duration_s is not None:
                elapsed = (workflow.now() - self._started_at).total_seconds()
                remaining = max(input.max_duration_s - elapsed, 0.001)
                try:
                    await workflow.wait_condition(
                        body.done,
                        timeout=timedelta(seconds=remaining),
                        timeout_summary="run timeout",
                    )
                except TimeoutError:
                    self._stop_state = RunState.TIMED_OUT
            return await asyncio.shield(body)
        except asyncio.CancelledError:
            if not body.done():
                self._stop_state = RunState.CANCELED
            await body
            raise

    async def _wait(
        self,
        condition: Callable[[], bool],
        *,
        # A workflow timer with a summary, which asyncio.timeout cannot give.
        timeout: timedelta | None = None,  # noqa: ASYNC109
        summary: str | None = None,
    ) -> None:
        """Wait for `condition`, raising `RunStoppedError` when the run is canceled or times out.

        Raises `TimeoutError` when `timeout` passes first.
        """
        await workflow.wait_condition(
            lambda: self._stop_state is not None or condition(),
            timeout=timeout,
            timeout_summary=summary,
        )
        if self._stop_state is not None:
            raise RunStoppedError(self._stop_state)

    async def _wait_for_runner(
        self,
        condition: Callable[[], bool],
        *,
        timeout: timedelta | None = None,  # noqa: ASYNC109
        summary: str | None = None,
    ) -> None:
        """Wait like `_wait` while the run's instance executes, checking that it is alive.

        Every INSTANCE_CHECK_INTERVAL the gateway reports the instance's state.
        Raises `RunFailedError` ("InstanceExited") when the instance exited or is gone.
        """
        if self._instance_id is None or not workflow.patched(PATCH_INSTANCE_CHECK):
            await self._wait(condition, timeout=timeout, summary=summary)
            return
        deadline = None if timeout is None else workflow.now() + timeout
        while True:
            interval = INSTANCE_CHECK_INTERVAL
            last = False
            if deadline is not None and deadline - workflow.now() <= interval:
                interval = max(deadline - workflow.now(), timedelta(0))
                last = True
            try:
                await self._wait(
                    condition,
                    timeout=interval,
                    summary=summary if last else f"next check of instance {self._instance_id}",
                )
                return
            except TimeoutError:
                if last:
                    raise
            await self._check_instance()
            if condition():
                return

    async def _check_instance(self) -> None:
        """Raise `RunFailedError` when the gateway reports the instance exited or gone."""
        assert self._instance_id is not None
        instance_id = self._instance_id
        try:
            state = await workflow.execute_activity_method(
                GatewayActivities.get_instance_state,
                InstanceStateInput(instance_id=instance_id, log_tail_bytes=INSTANCE_LOG_TAIL_BYTES),
                start_to_close_timeout=GATEWAY_CALL_TIMEOUT,
                retry_policy=GATEWAY_RETRY,
                summary=f"check instance {instance_id}",
            )
        except ActivityError as error:
            # A failed check tells nothing about the instance, so the next interval checks again.
            workflow.logger.warning(
                "run %s: checking instance %s failed: %s", self._run_id, instance_id, _cause(error)
            )
            return
        if state.state in _ALIVE_INSTANCE_STATES or self._finished is not None:
            return
        described = state.state or "gone"
        if state.exit_code is not None:
            described += f" with exit code {state.exit_code}"
        workflow.logger.error(
            "run %s: instance %s of runner %s is %s",
            self._run_id,
            instance_id,
            self._runner_id,
            described,
        )
        details: dict[str, Any] = {"instance_id": instance_id, "exit_code": state.exit_code}
        if state.log_tail:
            details["log_tail"] = state.log_tail
        raise RunFailedError(
            "InstanceExited",
            f"instance {instance_id} of runner {self._runner_id} is {described} "
            "while the task was running",
            details,
        )

    async def _drive(self) -> RunExecutionResult:
        try:
            if self._input.carried is None:
                await self._provision()
            elif self._state == RunState.SUSPENDED and self._pending is not None:
                await self._wait_suspended_and_restore(self._pending)

            while self._finished is None:
                await self._wait_for_runner(
                    lambda: (
                        self._finished is not None
                        or self._pending is not None
                        or self._should_continue_as_new()
                    )
                )
                if self._finished is not None:
                    break
                if self._pending is not None:
                    await self._suspend_cycle(self._pending)
                else:
                    await self._continue_as_new()
        except RunFailedError as error:
            workflow.logger.error("run %s failed: %s: %s", self._run_id, error.name, error)
            return await self._end(
                RunState.FAILED,
                error={"name": error.name, "message": error.message, **error.details},
            )
        except RunStoppedError as stopped:
            workflow.logger.info("run %s stopped: %s", self._run_id, stopped.state)
            await self._settle_snapshot_in_flight()
            return await self._end(stopped.state, error=self._stop_error(stopped.state))

        finished = self._finished
        if finished.ok:
            return await self._end(RunState.COMPLETED, output=finished.output)
        return await self._end(RunState.FAILED, error=finished.error or {"name": "TaskFailed"})

    def _stop_error(self, state: RunState) -> dict[str, Any]:
        if state == RunState.TIMED_OUT:
            limit = self._input.max_duration_s
            return {"name": "RunTimedOut", "message": f"the run exceeded its maximum of {limit} s"}
        return {"name": "RunCanceled", "message": "the run was canceled"}

    async def _provision(self) -> None:
        self._generation = 1
        self._runner_id = runner_id_for(self._run_id, self._generation)
        await self._record_status()
        try:
            result = await workflow.execute_activity_method(
                GatewayActivities.provision_instance,
                ProvisionInput(
                    run_id=self._run_id,
                    deployment_id=self._input.deployment_id,
                    runner_id=self._runner_id,
                    image=self._input.image,
                    cpu=self._input.cpu,
                    memory_gb=self._input.memory_gb,
                ),
                start_to_close_timeout=GATEWAY_CALL_TIMEOUT,
                retry_policy=GATEWAY_RETRY,
                summary=f"provision {self._input.image} for runner {self._runner_id}",
            )
        except ActivityError as error:
            now_ns = _ns(workflow.now())
            await self._span("compute.provision", now_ns, now_ns, _cause(error))
            raise RunFailedError("ProvisionFailed", _cause(error)) from error

        self._instance_id = result.instance_id
        self._set_state(RunState.EXECUTING)
        await self._span("compute.provision", result.start_ns, result.end_ns)
        await self._record_status()

    # -- suspend, snapshot, restore ---------------------------------------------

    async def _suspend_cycle(self, suspend: SuspendRequested) -> None:
        seq = self._suspend_seq
        self._set_state(RunState.SUSPENDING)
        await self._record_status()

        delay = timedelta(milliseconds=self._input.snapshot_delay_ms)
        outcome = await self._race(
            suspend, seq, delay if self._input.snapshots_enabled else None, "snapshot delay"
        )
        if outcome == "delay":
            snapshot = await self._take_snapshot(suspend)
            if snapshot is not None:
                await self._release_instance(suspend, snapshot)
                await self._wait_suspended_and_restore(suspend)
                return
            # A failed snapshot leaves the run executing in place on its live instance.
            self._set_state(RunState.EXECUTING)
            await self._record_status()
            outcome = await self._race(suspend, seq, None, "waitpoint")

        if outcome == "resolved":
            workflow.logger.info(
                "run %s continues in place after waitpoint %s", self._run_id, suspend.waitpoint_id
            )
        if self._pending is suspend:
            self._pending = None
        if self._state != RunState.EXECUTING:
            self._set_state(RunState.EXECUTING)
            await self._record_status()

    async def _race(
        self, suspend: SuspendRequested, seq: int, delay: timedelta | None, timer: str
    ) -> str:
        """Wait for the waitpoint, a newer suspend, the task's end, or `delay`.

        Returns "finished", "replaced", "resolved" or "delay".
        """
        timeout = delay
        due = self._duration_left(suspend)
        duration_first = due is not None and (timeout is None or due <= timeout)
        if duration_first:
            timeout = due
        summary = f"{'wait for' if duration_first else timer} {suspend.waitpoint_id}"
        # NOTE: this wait never continues as new, so a long wait in place adds one
        # instance check (a timer and an activity) to the history per INSTANCE_CHECK_INTERVAL.
        try:
            await self._wait_for_runner(
                lambda: (
                    self._finished is not None
                    or self._suspend_seq != seq
                    or suspend.waitpoint_id in self._completed
                ),
                timeout=timeout,
                summary=summary,
            )
        except TimeoutError:
            if duration_first:
                await self._complete_duration(suspend)
                return "resolved"
            return "delay"
        if self._finished is not None:
            return "finished"
        if self._suspend_seq != seq:
            return "replaced"
        return "resolved"

    def _duration_left(self, suspend: SuspendRequested) -> timedelta | None:
        if suspend.kind != WaitpointKind.DURATION or suspend.resume_at is None:
            return None
        return max(suspend.resume_at - workflow.now(), timedelta(0))

    async def _complete_duration(self, suspend: SuspendRequested) -> None:
        self._completed.setdefault(suspend.waitpoint_id, WaitpointCompleted(suspend.waitpoint_id))
        await workflow.execute_activity_method(
            DatabaseActivities.complete_waitpoint,
            WaitpointCompletionInput(waitpoint_id=suspend.waitpoint_id),
            start_to_close_timeout=DATABASE_TIMEOUT,
            retry_policy=DATABASE_RETRY,
            summary=f"complete duration waitpoint {suspend.waitpoint_id}",
        )

    async def _take_snapshot(self, suspend: SuspendRequested) -> SnapshotFinished | None:
        """Snapshot the current instance; return the completed callback, or None on failure."""
        assert self._instance_id is not None and self._runner_id is not None
        instance_id = self._instance_id
        self._snapshot_requests += 1
        request_id = f"{self._run_id}-s{self._snapshot_requests}"
        self._set_state(RunState.SNAPSHOTTING)
        await self._record_status()

        started_ns = _ns(workflow.now())
        try:
            requested = await workflow.execute_activity_method(
                GatewayActivities.request_snapshot,
                SnapshotRequestInput(
                    run_id=self._run_id,
                    runner_id=self._runner_id,
                    instance_id=instance_id,
                    request_id=request_id,
                ),
                task_queue=self._input.snapshot_task_queue,
                start_to_close_timeout=GATEWAY_CALL_TIMEOUT,
                schedule_to_close_timeout=SNAPSHOT_QUEUE_TIMEOUT,
                retry_policy=GATEWAY_RETRY,
                summary=f"snapshot instance {instance_id} at waitpoint {suspend.waitpoint_id}",
            )
        except ActivityError as error:
            workflow.logger.warning(
                "run %s: snapshot request for instance %s failed, continuing in place: %s",
                self._run_id,
                instance_id,
                _cause(error),
            )
            await self._span("compute.snapshot", started_ns, _ns(workflow.now()), _cause(error))
            return None
        started_ns = requested.requested_at_ns

        self._snapshot_in_flight = _SnapshotInFlight(request_id, instance_id, requested.snapshot_id)
        result = await self._await_snapshot_callback(request_id, instance_id, requested.snapshot_id)
        self._snapshot_in_flight = None
        ended_ns = result.received_at_ns or _ns(workflow.now())
        failed = result.status != SnapshotStatus.COMPLETED or not result.snapshot_id
        reason = (result.error or "the gateway reported no snapshot id") if failed else None
        await self._span(
            "compute.snapshot",
            started_ns,
            ended_ns,
            reason,
            {
                "vmflow.snapshot_id": result.snapshot_id or "",
                "vmflow.waitpoint_id": suspend.waitpoint_id,
            },
        )
        if failed:
            workflow.logger.warning(
                "run %s: snapshot of instance %s failed, continuing in place: %s",
                self._run_id,
                instance_id,
                reason,
            )
            return None
        return result

    async def _await_snapshot_callback(
        self, request_id: str, instance_id: str, snapshot_id: str | None
    ) -> SnapshotFinished:
        """Wait for the snapshot callback; when it is late, ask the gateway instead."""
        timeout = timedelta(seconds=self._input.snapshot_callback_timeout_s)
        for check in range(1, MAX_SNAPSHOT_CHECKS + 1):
            try:
                await self._wait(
                    lambda: request_id in self._snapshot_results,
                    timeout=timeout,
                    summary=f"snapshot callback {request_id}",
                )
                return self._snapshot_results.pop(request_id)
            except TimeoutError:
                pass

            state = await workflow.execute_activity_method(
                GatewayActivities.get_instance_state,
                InstanceStateInput(instance_id=instance_id, snapshot_id=snapshot_id),
                start_to_close_timeout=GATEWAY_CALL_TIMEOUT,
                retry_policy=GATEWAY_RETRY,
                summary=f"reconcile snapshot {request_id} (check {check})",
            )
            workflow.logger.warning(
                "run %s: no callback for snapshot %s after %s: instance %s is %s, "
                "snapshot %s is %s",
                self._run_id,
                request_id,
                timeout,
                instance_id,
                state.state,
                state.snapshot_id,
                state.snapshot_state,
            )
            reconciled = {METADATA_SNAPSHOT_REQUEST_ID: request_id, "reconciled": "true"}
            if state.snapshot_id and state.snapshot_state == "completed":
                return SnapshotFinished(
                    status=SnapshotStatus.COMPLETED,
                    instance_id=instance_id,
                    snapshot_id=state.snapshot_id,
                    metadata=reconciled,
                )
            if state.state == "snapshotting" or state.snapshot_state == "pending":
                continue
            if state.state in _LIVE_INSTANCE_STATES:
                return SnapshotFinished(
                    status=SnapshotStatus.FAILED,
                    instance_id=instance_id,
                    error=f"no snapshot callback and instance {instance_id} is {state.state}",
                    metadata=reconciled,
                )
            raise RunFailedError(
                "SnapshotLost",
                f"the snapshot callback of instance {instance_id} was lost and the gateway "
                f"reports the instance {state.state or 'not found'} with no completed snapshot",
            )
        return SnapshotFinished(
            status=SnapshotStatus.FAILED,
            instance_id=instance_id,
            error=f"snapshot still in progress after {MAX_SNAPSHOT_CHECKS} checks",
        )

    async def _release_instance(
        self, suspend: SuspendRequested, snapshot: SnapshotFinished
    ) -> None:
        """Record the checkpoint, then release the instance: the run holds no compute."""
        assert snapshot.snapshot_id is not None
        previous_snapshot = self._snapshot_id
        self._snapshot_id = snapshot.snapshot_id
        self._snapshot_count += 1
        await workflow.execute_activity_method(
            DatabaseActivities.record_checkpoint,
            CheckpointInput(
                run_id=self._run_id,
                snapshot_id=snapshot.snapshot_id,
                runner_id=self._runner_id,
                waitpoint_id=suspend.waitpoint_id,
            ),
            start_to_close_timeout=DATABASE_TIMEOUT,
            retry_policy=DATABASE_RETRY,
            summary=f"record COMPUTE checkpoint {snapshot.snapshot_id}",
        )
        await self._delete_instance()
        if previous_snapshot and previous_snapshot != snapshot.snapshot_id:
            await self._delete_snapshot(previous_snapshot)
        self._set_state(RunState.SUSPENDED)
        await self._record_status(instance_id="")

    async def _wait_suspended_and_restore(self, suspend: SuspendRequested) -> None:
        while True:
            due = self._duration_left(suspend)
            try:
                await self._wait(
                    lambda: (
                        suspend.waitpoint_id in self._completed or self._should_continue_as_new()
                    ),
                    timeout=due,
                    summary=f"wait for {suspend.waitpoint_id}",
                )
            except TimeoutError:
                await self._complete_duration(suspend)
            if suspend.waitpoint_id in self._completed:
                break
            await self._continue_as_new()
        await self._restore(suspend)

    async def _restore(self, suspend: SuspendRequested) -> None:
        assert self._snapshot_id is not None
        snapshot_id = self._snapshot_id
        # The new runner id is current before the restore returns, because the
        # restored runner may report before the activity completes.
        self._generation += 1
        self._runner_id = runner_id_for(self._run_id, self._generation)
        self._set_state(RunState.RESTORING)
        await self._record_status()
        try:
            result = await workflow.execute_activity_method(
                GatewayActivities.restore_snapshot,
                RestoreInput(
                    run_id=self._run_id,
                    deployment_id=self._input.deployment_id,
                    snapshot_id=snapshot_id,
                    runner_id=self._runner_id,
                    cpu=self._input.cpu,
                    memory_gb=self._input.memory_gb,
                ),
                start_to_close_timeout=RESTORE_TIMEOUT,
                retry_policy=GATEWAY_RETRY,
                summary=f"restore snapshot {snapshot_id} for runner {self._runner_id}",
            )
        except ActivityError as error:
            raise RunFailedError("RestoreFailed", _cause(error)) from error

        self._instance_id = result.instance_id
        self._restore_count += 1
        if self._pending is suspend:
            self._pending = None
        self._set_state(RunState.EXECUTING)
        await self._span(
            "compute.restore",
            result.start_ns,
            result.end_ns,
            None,
            {"vmflow.snapshot_id": snapshot_id},
        )
        await self._record_status()

    # -- end of the run ---------------------------------------------------------

    async def _end(
        self, state: RunState, output: Any = None, error: dict[str, Any] | None = None
    ) -> RunExecutionResult:
        """Release the instance and snapshot, then record the run's outcome."""
        await self._delete_instance()
        if self._snapshot_id is not None:
            await self._delete_snapshot(self._snapshot_id)
        self._set_state(state)
        await self._record_status(instance_id="", output=output, error=error)
        return RunExecutionResult(
            run_id=self._run_id,
            state=state,
            output=output,
            error=error,
            snapshot_count=self._snapshot_count,
            restore_count=self._restore_count,
        )

    async def _settle_snapshot_in_flight(self) -> None:
        """Wait for a snapshot requested before the run stopped, then delete it if it completed.

        Without the wait, deleting the snapshotting instance fails (409) and a
        snapshot that completes after the run ended is never deleted. The wait
        is bounded by SNAPSHOT_SETTLE_TIMEOUT, after which the run reads the
        snapshot's state from the gateway once.
        """
        in_flight = self._snapshot_in_flight
        if in_flight is None or not workflow.patched(PATCH_SETTLE_SNAPSHOT):
            return
        self._snapshot_in_flight = None
        request_id = in_flight.request_id
        try:
            await workflow.wait_condition(
                lambda: request_id in self._snapshot_results,
                timeout=SNAPSHOT_SETTLE_TIMEOUT,
                timeout_summary=f"settle snapshot {request_id} before release",
            )
        except TimeoutError:
            snapshot_id = await self._completed_snapshot_of(in_flight)
        else:
            result = self._snapshot_results.pop(request_id)
            completed = result.status == SnapshotStatus.COMPLETED
            snapshot_id = result.snapshot_id if completed else None
        if snapshot_id is not None and snapshot_id != self._snapshot_id:
            await self._delete_snapshot(snapshot_id)

    async def _completed_snapshot_of(self, in_flight: _SnapshotInFlight) -> str | None:
        """Return the id of the in-flight snapshot if the gateway reports it completed."""
        try:
            state = await workflow.execute_activity_method(
                GatewayActivities.get_instance_state,
                InstanceStateInput(
                    instance_id=in_flight.instance_id, snapshot_id=in_flight.snapshot_id
                ),
                start_to_close_timeout=GATEWAY_CALL_TIMEOUT,
                retry_policy=GATEWAY_RETRY,
                summary=f"reconcile snapshot {in_flight.request_id} before release",
            )
        except ActivityError as error:
            reason = _cause(error)
        else:
            if state.snapshot_id and state.snapshot_state == "completed":
                return state.snapshot_id
            reason = f"instance is {state.state}, snapshot is {state.snapshot_state}"
        workflow.logger.error(
            "run %s: no result for snapshot %s of instance %s within %s after the run stopped "
            "(%s); the gateway may still hold the instance or the snapshot",
            self._run_id,
            in_flight.request_id,
            in_flight.instance_id,
            SNAPSHOT_SETTLE_TIMEOUT,
            reason,
        )
        return None

    async def _delete_instance(self) -> None:
        if self._instance_id is None:
            return
        instance_id = self._instance_id
        try:
            await workflow.execute_activity_method(
                GatewayActivities.delete_instance,
                DeleteInstanceInput(instance_id=instance_id),
                start_to_close_timeout=GATEWAY_CALL_TIMEOUT,
                retry_policy=GATEWAY_RETRY,
                summary=f"release instance {instance_id}",
            )
        except ActivityError as error:
            workflow.logger.error(
                "run %s: failed to delete instance %s: %s", self._run_id, instance_id, _cause(error)
            )
        self._instance_id = None
        self._publish_state()

    async def _delete_snapshot(self, snapshot_id: str) -> None:
        try:
            await workflow.execute_activity_method(
                GatewayActivities.delete_snapshot,
                DeleteSnapshotInput(snapshot_id=snapshot_id),
                start_to_close_timeout=GATEWAY_CALL_TIMEOUT,
                retry_policy=GATEWAY_RETRY,
                summary=f"delete snapshot {snapshot_id}",
            )
        except ActivityError as error:
            workflow.logger.error(
                "run %s: failed to delete snapshot %s: %s", self._run_id, snapshot_id, _cause(error)
            )

    # -- continue-as-new --------------------------------------------------------

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        limit = self._input.continue_as_new_after_events
        if limit is not None and info.get_current_history_length() >= limit:
            return True
        return info.is_continue_as_new_suggested()

    async def _continue_as_new(self) -> None:
        await workflow.wait_condition(workflow.all_handlers_finished)
        kept = list(self._completed.items())[-MAX_CARRIED_WAITPOINTS:]
        carried = RunCarryOver(
            state=self._state,
            generation=self._generation,
            runner_id=self._runner_id,
            instance_id=self._instance_id,
            snapshot_id=self._snapshot_id,
            started_at=self._started_at,
            pending_suspend=self._pending,
            completed_waitpoints=dict(kept),
            snapshot_count=self._snapshot_count,
            restore_count=self._restore_count,
            snapshot_requests=self._snapshot_requests,
        )
        workflow.logger.info("run %s continues as new in state %s", self._run_id, self._state)
        workflow.continue_as_new(dataclasses.replace(self._input, carried=carried))

    # -- bookkeeping --------------------------------------------------------------

    def _set_state(self, state: RunState) -> None:
        self._state = state
        self._publish_state()

    def _publish_state(self) -> None:
        """Show the state in search attributes and in the UI's current details."""
        instance = (
            SEARCH_INSTANCE_ID.value_set(self._instance_id)
            if self._instance_id
            else SEARCH_INSTANCE_ID.value_unset()
        )
        workflow.upsert_search_attributes([SEARCH_RUN_STATE.value_set(self._state.value), instance])
        waitpoint = self._pending.waitpoint_id if self._pending else "none"
        workflow.set_current_details(
            f"**{self._state.value}**  \n"
            f"runner `{self._runner_id}` · instance `{self._instance_id}` · "
            f"snapshot `{self._snapshot_id}` · waitpoint `{waitpoint}`  \n"
            f"{self._snapshot_count} snapshots, {self._restore_count} restores"
        )

    async def _record_status(
        self, *, instance_id: str | None = None, output: Any = None, error: Any = None
    ) -> None:
        await workflow.execute_activity_method(
            DatabaseActivities.record_run_status,
            RunStatusInput(
                run_id=self._run_id,
                status=_db_status(self._state),
                runner_id=self._runner_id,
                instance_id=self._instance_id if instance_id is None else instance_id,
                output=output,
                error=error,
            ),
            start_to_close_timeout=DATABASE_TIMEOUT,
            retry_policy=DATABASE_RETRY,
            summary=f"record run {self._state.value}",
        )

    async def _span(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        error: str | None = None,
        attributes: dict[str, str | int | float | bool] | None = None,
    ) -> None:
        span_attributes: dict[str, str | int | float | bool] = {
            "vmflow.run_id": self._run_id,
            "vmflow.deployment_id": self._input.deployment_id,
            "vmflow.runner_id": self._runner_id or "",
            "vmflow.instance_id": self._instance_id or "",
        }
        span_attributes.update(attributes or {})
        try:
            await workflow.execute_activity_method(
                SpanActivities.record_compute_span,
                ComputeSpanInput(
                    name=name,
                    start_ns=start_ns,
                    end_ns=end_ns,
                    trace_context=self._input.trace_context,
                    attributes=span_attributes,
                    error=error,
                ),
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=SPAN_RETRY,
                summary=f"span {name}",
            )
        except ActivityError as failure:
            workflow.logger.warning(
                "run %s: span %s was not recorded: %s", self._run_id, name, _cause(failure)
            )


def _cause(error: ActivityError) -> str:
    cause = error.cause
    return str(cause) if cause is not None else str(error)
