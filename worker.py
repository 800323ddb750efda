"""vmflow's Temporal worker: `python worker.py`, or `run_worker(settings)` from the CLI.

One process serves two task queues: the main queue (workflows and every
activity but snapshot requests) and the snapshot queue, whose activity slots
equal COMPUTE_SNAPSHOT_DISPATCH_LIMIT so that no more snapshot requests are
in flight from this worker. SIGTERM and SIGINT stop polling, let running
activities finish (up to GRACEFUL_SHUTDOWN), and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.database import DatabaseActivities
from activities.gateway import GatewayActivities
from activities.spans import SpanActivities
from activities.tokens import MissingWorkloadSecretError, workload_token_issuer
from vmflow.compute import ComputeClient
from vmflow.config import ConfigError, Settings, configure_logging, get_settings
from vmflow.storage.db import create_engine_from_url, session_factory
from vmflow.telemetry import (
    ComputeSpanRecorder,
    build_tracer_provider,
    temporal_tracing_interceptor,
)
from workflows.contract import MAIN_TASK_QUEUE, SNAPSHOT_TASK_QUEUE
from workflows.deploy_template import DeployTemplateWorkflow
from workflows.run_execution import RunExecutionWorkflow
from workflows.template_build import TemplateBuildWorkflow

logger = logging.getLogger("vmflow.worker")

WORKFLOWS: Sequence[type] = (RunExecutionWorkflow, DeployTemplateWorkflow, TemplateBuildWorkflow)

# How long running activities may take to finish after SIGTERM before they are cancelled.
GRACEFUL_SHUTDOWN = timedelta(seconds=30)
# Threads for the synchronous database and span activities.
SYNC_ACTIVITY_THREADS = 8


@dataclass
class ActivitySet:
    """The activity objects one worker process serves."""

    gateway: GatewayActivities
    database: DatabaseActivities
    spans: SpanActivities


def build_workers(
    client: Client,
    activities: ActivitySet,
    *,
    snapshot_dispatch_limit: int,
    executor: ThreadPoolExecutor,
    task_queue: str = MAIN_TASK_QUEUE,
    snapshot_task_queue: str = SNAPSHOT_TASK_QUEUE,
    max_cached_workflows: int = 1000,
) -> list[Worker]:
    """Build the main worker and the snapshot worker, whose activity slots are the limit.

    `max_cached_workflows=0` turns off sticky execution, so every workflow task
    replays from history on whichever worker polls it.
    """
    main = Worker(
        client,
        task_queue=task_queue,
        workflows=list(WORKFLOWS),
        activities=[
            activities.gateway.provision_instance,
            activities.gateway.get_instance_state,
            activities.gateway.restore_snapshot,
            activities.gateway.delete_instance,
            activities.gateway.delete_snapshot,
            activities.gateway.create_template,
            activities.database.record_run_status,
            activities.database.record_checkpoint,
            activities.database.complete_waitpoint,
            activities.database.load_deployment_context,
            activities.database.record_deployment,
            activities.spans.record_compute_span,
        ],
        activity_executor=executor,
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        max_cached_workflows=max_cached_workflows,
    )
    snapshots = Worker(
        client,
        task_queue=snapshot_task_queue,
        activities=[activities.gateway.request_snapshot],
        max_concurrent_activities=snapshot_dispatch_limit,
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
    )
    return [main, snapshots]


async def run_workers_until(workers: Sequence[Worker], stop: asyncio.Event) -> None:
    """Run `workers` until `stop` is set, then shut them down gracefully."""
    tasks = [asyncio.create_task(worker.run()) for worker in workers]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and task.exception() is not None:
                logger.error("a worker stopped with an error: %r", task.exception())
    finally:
        stopper.cancel()
        await asyncio.gather(*(worker.shutdown() for worker in workers), return_exceptions=True)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                logger.error("worker shut down with an error: %r", result)


async def run_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Connect to TEMPORAL_ADDRESS and serve both task queues until SIGTERM, SIGINT or `stop`."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)

    temporal_provider = build_tracer_provider(
        str(settings.OTEL_EXPORTER_OTLP_ENDPOINT) if settings.OTEL_EXPORTER_OTLP_ENDPOINT else None
    )
    compute_provider = build_tracer_provider(
        str(settings.COMPUTE_TRACE_OTLP_ENDPOINT) if settings.COMPUTE_TRACE_OTLP_ENDPOINT else None
    )
    client = await Client.connect(
        settings.TEMPORAL_ADDRESS,
        namespace=settings.TEMPORAL_NAMESPACE,
        interceptors=[temporal_tracing_interceptor(temporal_provider)],
    )
    gateway = (
        ComputeClient.from_settings(settings) if settings.COMPUTE_GATEWAY_URL is not None else None
    )
    engine = create_engine_from_url(settings.DATABASE_URL)
    activities = ActivitySet(
        gateway=GatewayActivities(
            gateway,
            api_url=str(settings.VMFLOW_API_URL),
            issue_token=workload_token_issuer(settings),
        ),
        database=DatabaseActivities(
            session_factory(engine),
            gateway_configured=gateway is not None,
            shadow_rollout_pct=settings.COMPUTE_TEMPLATE_SHADOW_ROLLOUT_PCT,
        ),
        spans=SpanActivities(ComputeSpanRecorder(compute_provider)),
    )

    executor = ThreadPoolExecutor(SYNC_ACTIVITY_THREADS, thread_name_prefix="vmflow-activity")
    workers = build_workers(
        client,
        activities,
        snapshot_dispatch_limit=settings.COMPUTE_SNAPSHOT_DISPATCH_LIMIT,
        executor=executor,
    )
    logger.info(
        "worker serving %s and %s (%d snapshot slots) on %s, namespace %s",
        MAIN_TASK_QUEUE,
        SNAPSHOT_TASK_QUEUE,
        settings.COMPUTE_SNAPSHOT_DISPATCH_LIMIT,
        settings.TEMPORAL_ADDRESS,
        settings.TEMPORAL_NAMESPACE,
    )
    try:
        await run_workers_until(workers, stop)
    finally:
        executor.shutdown(wait=True)
        if gateway is not None:
            await gateway.aclose()
        engine.dispose()
        temporal_provider.shutdown()
        compute_provider.shutdown()
        logger.info("worker stopped")


def main() -> int:
    configure_logging()
    try:
        settings = get_settings()
        # Checked before connecting, so a missing secret fails at once with its name.
        workload_token_issuer(settings)
    except (ConfigError, MissingWorkloadSecretError) as error:
        print(error, file=sys.stderr)
        return 2
    asyncio.run(run_worker(settings))
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # NOTE: exiting through the interpreter's shutdown sometimes aborts with
    # "PyGILState_Release" after a Temporal worker ran (temporalio 1.35); os._exit avoids it.
    os._exit(status)
