"""Tracing of vmflow: Temporal's interceptor and the compute spans, both over OTLP/HTTP."""

from vmflow.telemetry.tracing import (
    ComputeSpanRecorder,
    build_tracer_provider,
    otlp_traces_url,
    temporal_tracing_interceptor,
)

__all__ = [
    "ComputeSpanRecorder",
    "build_tracer_provider",
    "otlp_traces_url",
    "temporal_tracing_interceptor",
]
