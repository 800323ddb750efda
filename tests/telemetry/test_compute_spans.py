"""Compute spans and Temporal's spans, exported over OTLP/HTTP to a real receiver."""

from __future__ import annotations

import contextlib
from datetime import timedelta

from temporalio.client import Client

from tests.telemetry.otlp_receiver import running_receiver
from tests.workflows.conftest import Harness
from tests.workflows.test_run_execution import (
    DELAY,
    finish,
    resolve,
    start_run,
    started_runner,
    suspend,
)
from vmflow.telemetry import (
    ComputeSpanRecorder,
    build_tracer_provider,
    otlp_traces_url,
    temporal_tracing_interceptor,
)
from worker import build_workers
from workflows.contract import RunState

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


def test_otlp_traces_url_adds_path() -> None:
    assert otlp_traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert otlp_traces_url("http://127.0.0.1:4318/") == "http://127.0.0.1:4318/v1/traces"
    assert otlp_traces_url("http://collector:4318/custom") == "http://collector:4318/custom"


def test_recorder_exports_exact_nanoseconds() -> None:
    start_ns = 1_764_000_000_123_456_789
    end_ns = start_ns + 987_654_321
    with running_receiver() as receiver:
        provider = build_tracer_provider(receiver.endpoint, service_name="vmflow-test")
        recorder = ComputeSpanRecorder(provider)

        recorded = recorder.record(
            "compute.snapshot",
            start_ns=start_ns,
            end_ns=end_ns,
            parent={"traceparent": TRACEPARENT},
            attributes={"vmflow.run_id": "run-1"},
            error="criu dump failed",
        )
        assert recorder.flush()
        provider.shutdown()

    (span,) = receiver.named("compute.snapshot")
    assert span.start_time_unix_nano == start_ns
    assert span.end_time_unix_nano == end_ns
    assert span.trace_id.hex() == TRACE_ID
    assert span.parent_span_id.hex() == PARENT_SPAN_ID
    assert span.span_id.hex() == recorded.span_id
    assert recorded.parent_span_id == PARENT_SPAN_ID
    assert span.status.message == "criu dump failed"
    attributes = {a.key: a.value.string_value for a in span.attributes}
    assert attributes["vmflow.run_id"] == "run-1"
    assert receiver.spans[0].service_name == "vmflow-test"


def test_recorder_without_parent_starts_trace() -> None:
    with running_receiver() as receiver:
        provider = build_tracer_provider(receiver.endpoint)
        recorded = ComputeSpanRecorder(provider).record(
            "compute.provision", start_ns=10, end_ns=20, parent={}
        )
        provider.force_flush()
        provider.shutdown()

    assert recorded.parent_span_id is None
    (span,) = receiver.named("compute.provision")
    assert span.parent_span_id == b""


def test_recorder_with_collector_down_does_not_raise(closed_tcp_port: int) -> None:
    provider = build_tracer_provider(f"http://127.0.0.1:{closed_tcp_port}")
    recorder = ComputeSpanRecorder(provider)

    recorded = recorder.record(
        "compute.restore", start_ns=1, end_ns=2, parent={"traceparent": TRACEPARENT}
    )

    assert recorded.trace_id == TRACE_ID
    # Shutting down drops what the exporter cannot send; it must not raise.
    provider.shutdown()


async def test_run_exports_compute_spans_to_receiver(harness: Harness) -> None:
    with running_receiver() as receiver:
        provider = build_tracer_provider(receiver.endpoint)
        harness.recorder = ComputeSpanRecorder(provider)
        await harness.start_workers()

        run_id, handle = await start_run(harness, trace_context={"traceparent": TRACEPARENT})
        runner = await started_runner(harness, handle, run_id)
        await suspend(handle, runner, "wp-traced")
        await harness.env.sleep(DELAY + timedelta(seconds=1))
        await harness.gateway.wait_for("instances.delete")
        await resolve(handle, "wp-traced")
        await harness.gateway.wait_for("snapshots.restore")
        result = await finish(handle, f"{run_id}-r2")
        assert result.state == RunState.COMPLETED

        await harness.stop_workers()
        assert provider.force_flush()
        provider.shutdown()

    for name in ("compute.provision", "compute.snapshot", "compute.restore"):
        spans = receiver.named(name)
        assert len(spans) == 1, name
        span = spans[0]
        assert span.trace_id.hex() == TRACE_ID, name
        assert span.parent_span_id.hex() == PARENT_SPAN_ID, name
        # Nanoseconds since the Unix epoch, measured around the gateway calls.
        assert span.start_time_unix_nano > 1_600_000_000 * 10**9, name
        assert span.end_time_unix_nano >= span.start_time_unix_nano, name
        attributes = {a.key: a.value.string_value for a in span.attributes}
        assert attributes["vmflow.run_id"] == run_id, name

    create_call = harness.gateway.calls_of("instances.create")[0]
    provision = receiver.named("compute.provision")[0]
    assert provision.start_time_unix_nano <= create_call.at_ns <= provision.end_time_unix_nano


async def test_tracing_interceptor_exports_workflow_spans(harness: Harness) -> None:
    with running_receiver() as receiver:
        provider = build_tracer_provider(receiver.endpoint, service_name="vmflow-worker")
        config = harness.client.config()
        config["interceptors"] = [temporal_tracing_interceptor(provider)]
        traced = Client(**config)
        async with contextlib.AsyncExitStack() as stack:
            for worker in build_workers(
                traced,
                harness.activities(),
                snapshot_dispatch_limit=1,
                executor=harness.executor,
                task_queue=harness.task_queue,
                snapshot_task_queue=harness.snapshot_task_queue,
            ):
                await stack.enter_async_context(worker)
            run_id, handle = await start_run(harness)
            traced_handle = traced.get_workflow_handle(handle.id)
            runner = await started_runner(harness, handle, run_id)
            await traced_handle.signal("runner_finished", {"runner_id": runner, "ok": True})
            await handle.result()
        assert provider.force_flush()
        provider.shutdown()

    names = {received.span.name for received in receiver.spans}
    assert "RunWorkflow:RunExecutionWorkflow" in names
    assert "RunActivity:provision_instance" in names
    assert "SignalWorkflow:runner_finished" in names
    assert {received.service_name for received in receiver.spans} == {"vmflow-worker"}
