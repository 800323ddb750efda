"""Tracer providers, OTLP/HTTP export and the compute spans.

Compute spans (`compute.provision`, `compute.snapshot`, `compute.restore`)
carry the nanosecond start and end times measured around gateway calls, and
are children of the run's W3C trace context. They go through a
`BatchSpanProcessor`: ending a span only appends it to an in-memory queue,
and a background thread exports, so a collector that is down never slows a
run (spans beyond the queue's capacity are dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from temporalio.contrib.opentelemetry import TracingInterceptor

logger = logging.getLogger(__name__)

SERVICE_NAME = "vmflow-worker"
COMPUTE_TRACER_NAME = "vmflow.compute"

# Seconds one OTLP export may take; it runs on the processor's thread, never a run's.
EXPORT_TIMEOUT_S = 5.0

AttributeValue = str | int | float | bool

_propagator = TraceContextTextMapPropagator()


def otlp_traces_url(endpoint: str) -> str:
    """Return the OTLP/HTTP traces URL for `endpoint`, adding `/v1/traces` to a bare base URL."""
    path = urlsplit(endpoint).path
    if path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def build_tracer_provider(
    endpoint: str | None,
    *,
    service_name: str = SERVICE_NAME,
    exporter: SpanExporter | None = None,
) -> TracerProvider:
    """Build a tracer provider that batches spans to `endpoint` (or `exporter`).

    With neither, the provider records nothing outside the process. The
    provider is not installed globally; the caller owns it and calls
    `shutdown()` at exit.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is None and endpoint:
        exporter = OTLPSpanExporter(endpoint=otlp_traces_url(endpoint), timeout=EXPORT_TIMEOUT_S)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def temporal_tracing_interceptor(provider: TracerProvider | None = None) -> TracingInterceptor:
    """Return Temporal's OpenTelemetry interceptor, tracing through `provider` or the global one.

    Workflow spans are created even for workflows started by a client without
    the interceptor, so every run and deployment appears in traces.
    """
    tracer = (provider or trace.get_tracer_provider()).get_tracer("temporalio")
    return TracingInterceptor(tracer, always_create_workflow_spans=True)


@dataclass(frozen=True)
class RecordedSpan:
    """Ids of a recorded span, as lowercase hex."""

    trace_id: str
    span_id: str
    parent_span_id: str | None


class ComputeSpanRecorder:
    """Records compute spans with explicit times, parented on a W3C trace context."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer(COMPUTE_TRACER_NAME)

    def record(
        self,
        name: str,
        *,
        start_ns: int,
        end_ns: int,
        parent: Mapping[str, str],
        attributes: Mapping[str, AttributeValue] | None = None,
        error: str | None = None,
    ) -> RecordedSpan:
        """Record one finished span from `start_ns` to `end_ns` (Unix epoch nanoseconds).

        `parent` is a carrier with `traceparent` (and maybe `tracestate`); an
        empty or invalid one makes the span the root of a new trace.
        """
        if end_ns < start_ns:
            raise ValueError(f"span {name!r} ends at {end_ns} ns, before its start {start_ns} ns")
        context = _propagator.extract(dict(parent))
        parent_span = trace.get_current_span(context).get_span_context()

        span = self._tracer.start_span(
            name,
            context=context,
            kind=SpanKind.INTERNAL,
            attributes=dict(attributes or {}),
            start_time=start_ns,
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=end_ns)

        span_context = span.get_span_context()
        return RecordedSpan(
            trace_id=f"{span_context.trace_id:032x}",
            span_id=f"{span_context.span_id:016x}",
            parent_span_id=f"{parent_span.span_id:016x}" if parent_span.is_valid else None,
        )

    def flush(self, timeout_ms: int = 5_000) -> bool:
        """Export queued spans now; return False if that took longer than `timeout_ms`."""
        return self._provider.force_flush(timeout_ms)
