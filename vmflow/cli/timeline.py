"""A run's timeline, read from its workflow history: provision, suspend, snapshot, restore, end."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowFailureError
from temporalio.converter import DataConverter

from workflows import contract

PROVISION_ACTIVITY = "provision_instance"
RESTORE_ACTIVITY = "restore_snapshot"


@dataclass(frozen=True)
class TimelineEntry:
    at: datetime
    step: str
    detail: str = ""


@dataclass
class RunTimeline:
    """The steps of one run in history order, plus the facts a caller checks."""

    workflow_id: str
    started_at: datetime
    entries: list[TimelineEntry] = field(default_factory=list)
    provision_mode: str | None = None
    snapshot_ids: list[str] = field(default_factory=list)
    restores: int = 0

    def offset_ms(self, entry: TimelineEntry) -> float:
        return (entry.at - self.started_at).total_seconds() * 1000


def _time(event: HistoryEvent) -> datetime:
    return event.event_time.ToDatetime(tzinfo=UTC)


def _decode(payloads: Any) -> list[Any]:
    if not payloads.payloads:
        return []
    values: list[Any] = DataConverter.default.payload_converter.from_payloads(payloads.payloads)
    return values


def _gateway_ms(result: dict[str, Any]) -> str:
    start_ns, end_ns = result.get("start_ns"), result.get("end_ns")
    if isinstance(start_ns, int) and isinstance(end_ns, int):
        return f"{(end_ns - start_ns) / 1e6:.1f} ms at the gateway"
    return ""


async def read_run_timeline(client: Client, run_id: str) -> RunTimeline:
    """Read `run-<run id>`'s history into a timeline, once the workflow has closed."""
    workflow_id = contract.run_workflow_id(run_id)
    handle = client.get_workflow_handle(workflow_id)
    # The run's row turns final before the workflow releases the instance and
    # closes, so the history is complete only after the result.
    with contextlib.suppress(WorkflowFailureError):
        await handle.result()
    scheduled: dict[int, str] = {}
    timeline: RunTimeline | None = None

    async for event in handle.fetch_history_events():
        at = _time(event)
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            timeline = RunTimeline(workflow_id=workflow_id, started_at=at)
            timeline.entries.append(TimelineEntry(at, "run started", workflow_id))
            continue
        assert timeline is not None, "history does not begin with WorkflowExecutionStarted"

        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attributes = event.activity_task_scheduled_event_attributes
            scheduled[event.event_id] = attributes.activity_type.name
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attributes_completed = event.activity_task_completed_event_attributes
            name = scheduled.get(attributes_completed.scheduled_event_id)
            results = _decode(attributes_completed.result)
            result = results[0] if results and isinstance(results[0], dict) else {}
            if name == PROVISION_ACTIVITY:
                mode = (result.get("gateway_timing") or {}).get("mode", "unknown")
                timeline.provision_mode = "warm" if mode == "template" else mode
                timeline.entries.append(
                    TimelineEntry(
                        at,
                        f"provision ({timeline.provision_mode})",
                        f"instance {result.get('instance_id')}, {_gateway_ms(result)}",
                    )
                )
            elif name == RESTORE_ACTIVITY:
                timeline.restores += 1
                timeline.entries.append(
                    TimelineEntry(
                        at,
                        "restore",
                        f"instance {result.get('instance_id')} as runner "
                        f"{result.get('runner_id')}, {_gateway_ms(result)}",
                    )
                )
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            attributes_signaled = event.workflow_execution_signaled_event_attributes
            values = _decode(attributes_signaled.input)
            payload = values[0] if values and isinstance(values[0], dict) else {}
            _add_signal(timeline, at, attributes_signaled.signal_name, payload)
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            if request.input.name == contract.UPDATE_COMPLETE_WAITPOINT:
                values = _decode(request.input.args)
                payload = values[0] if values and isinstance(values[0], dict) else {}
                timeline.entries.append(
                    TimelineEntry(at, "waitpoint completed", str(payload.get("waitpoint_id")))
                )
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            timeline.entries.append(TimelineEntry(at, "run completed"))
        elif event.event_type in (
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
        ):
            timeline.entries.append(
                TimelineEntry(at, "run ended", EventType.Name(event.event_type))
            )

    if timeline is None:
        raise ValueError(f"workflow {workflow_id} has no history")
    return timeline


def _add_signal(timeline: RunTimeline, at: datetime, name: str, payload: dict[str, Any]) -> None:
    if name == contract.SIGNAL_RUNNER_STARTED:
        timeline.entries.append(TimelineEntry(at, "runner started", str(payload.get("runner_id"))))
    elif name == contract.SIGNAL_SUSPEND_REQUESTED:
        timeline.entries.append(
            TimelineEntry(
                at,
                "suspend requested",
                f"{payload.get('kind')} waitpoint {payload.get('waitpoint_id')}",
            )
        )
    elif name == contract.SIGNAL_SNAPSHOT_FINISHED:
        if payload.get("status") == contract.SnapshotStatus.COMPLETED.value:
            snapshot_id = str(payload.get("snapshot_id"))
            timeline.snapshot_ids.append(snapshot_id)
            duration = payload.get("duration_ms")
            detail = f"snapshot {snapshot_id}" + (
                f", {duration:.1f} ms at the gateway" if isinstance(duration, int | float) else ""
            )
            timeline.entries.append(TimelineEntry(at, "snapshot taken", detail))
        else:
            timeline.entries.append(TimelineEntry(at, "snapshot failed", str(payload.get("error"))))
    elif name == contract.SIGNAL_WAITPOINT_COMPLETED:
        timeline.entries.append(
            TimelineEntry(at, "waitpoint completed", str(payload.get("waitpoint_id")))
        )
    elif name == contract.SIGNAL_RUNNER_RESUMED:
        timeline.entries.append(TimelineEntry(at, "runner resumed", str(payload.get("runner_id"))))
    elif name == contract.SIGNAL_RUNNER_FINISHED:
        outcome = "returned" if payload.get("ok") else "raised"
        timeline.entries.append(TimelineEntry(at, f"task {outcome}", str(payload.get("runner_id"))))
