"""Retry policies and timeouts shared by vmflow's workflows.

Gateway calls back off from 1 s to 30 s; errors an activity marks
non-retryable (4xx validation errors) are never retried.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy

GATEWAY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=8,
)
DATABASE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=20,
)
# Spans are best effort: one retry, then the run goes on without the span.
SPAN_RETRY = RetryPolicy(maximum_attempts=2)

GATEWAY_CALL_TIMEOUT = timedelta(seconds=60)
# Restores boot a microVM or CRIU-restore a process tree before the gateway responds.
RESTORE_TIMEOUT = timedelta(minutes=5)
# A snapshot request may wait this long in the snapshot queue for a free slot.
SNAPSHOT_QUEUE_TIMEOUT = timedelta(minutes=10)
DATABASE_TIMEOUT = timedelta(seconds=30)
