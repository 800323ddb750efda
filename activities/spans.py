"""Activity that records compute spans; recording only queues the span for export."""

from __future__ import annotations

from dataclasses import dataclass, field

from temporalio import activity

from vmflow.telemetry import ComputeSpanRecorder


@dataclass
class ComputeSpanInput:
    name: str
    # Unix epoch nanoseconds.
    start_ns: int
    end_ns: int
    # The run's W3C trace context; the span becomes its child.
    trace_context: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ComputeSpanResult:
    trace_id: str
    span_id: str
    parent_span_id: str | None


class SpanActivities:
    def __init__(self, recorder: ComputeSpanRecorder) -> None:
        self._recorder = recorder

    @activity.defn(name="record_compute_span")
    def record_compute_span(self, input: ComputeSpanInput) -> ComputeSpanResult:
        """Record one compute span; export happens later on the exporter's own thread."""
        span = self._recorder.record(
            input.name,
            start_ns=input.start_ns,
            end_ns=max(input.end_ns, input.start_ns),
            parent=input.trace_context,
            attributes=input.attributes,
            error=input.error,
        )
        return ComputeSpanResult(
            trace_id=span.trace_id, span_id=span.span_id, parent_span_id=span.parent_span_id
        )
