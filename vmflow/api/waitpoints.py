"""Waitpoints in the database: create them idempotently, settle expired ones, complete tokens.

A waitpoint is PENDING until it is COMPLETED (a token completed with an
output, or a duration whose `resume_at` has passed) or TIMED_OUT (a token
whose `timeout_at` passed first). COMPLETED and TIMED_OUT are final. Reads
through `settle_waitpoint` apply the clock, so a waitpoint is never seen
PENDING after its time, even when no timer has fired yet.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmflow.api.json_values import InvalidJsonValueError, check_json_value
from vmflow.storage.models import (
    TaskRun,
    Waitpoint,
    WaitpointKind,
    WaitpointStatus,
    utc_now,
)

logger = logging.getLogger(__name__)


class WaitpointError(Exception):
    """Root of the errors raised by waitpoint operations."""


class WaitpointNotFoundError(WaitpointError):
    pass


class WaitpointStateError(WaitpointError):
    """The waitpoint is of the wrong kind or already final for the requested operation."""


class WaitpointOutputError(WaitpointError):
    """A token output is not JSON-serializable."""


def ensure_json_value(value: Any, what: str) -> Any:
    """Return `value` unchanged if it is strict JSON, else raise `WaitpointOutputError`."""
    try:
        check_json_value(value, "output")
    except InvalidJsonValueError as error:
        raise WaitpointOutputError(
            f"{what} is not valid JSON ({error}); pass dicts, lists, strings, "
            "finite numbers, booleans or None"
        ) from error
    return value


def settle_waitpoint(waitpoint: Waitpoint, now: datetime | None = None) -> bool:
    """Complete a due duration or time out an expired token; return whether it changed."""
    if waitpoint.status is not WaitpointStatus.PENDING:
        return False
    current = now or utc_now()

    if waitpoint.kind is WaitpointKind.DURATION and waitpoint.resume_at is not None:
        if current >= waitpoint.resume_at:
            waitpoint.status = WaitpointStatus.COMPLETED
            waitpoint.completed_at = current
            return True
    if waitpoint.kind is WaitpointKind.TOKEN and waitpoint.timeout_at is not None:
        if current >= waitpoint.timeout_at:
            waitpoint.status = WaitpointStatus.TIMED_OUT
            waitpoint.completed_at = current
            return True
    return False


def create_waitpoint(
    session: Session,
    run: TaskRun,
    *,
    kind: WaitpointKind,
    idempotency_key: str,
    resume_at: datetime | None = None,
    timeout_at: datetime | None = None,
) -> tuple[Waitpoint, bool]:
    """Create a waitpoint of `run`, or return the one created earlier with `idempotency_key`.

    Returns the waitpoint and whether it was created by this call. A retried
    request with the same key returns the same waitpoint even when the retry
    carries other times, because the first request is the one the runner
    waits on.
    """
    existing = session.scalar(
        select(Waitpoint).where(
            Waitpoint.run_id == run.id, Waitpoint.idempotency_key == idempotency_key
        )
    )
    if existing is not None:
        return existing, False

    if kind is WaitpointKind.DURATION and resume_at is None:
        raise WaitpointStateError("a DURATION waitpoint needs resume_at")
    waitpoint = Waitpoint(
        run_id=run.id,
        kind=kind,
        idempotency_key=idempotency_key,
        resume_at=resume_at if kind is WaitpointKind.DURATION else None,
        timeout_at=timeout_at if kind is WaitpointKind.TOKEN else None,
    )
    session.add(waitpoint)
    session.flush()
    return waitpoint, True


def get_waitpoint(session: Session, waitpoint_id: str, *, for_update: bool = False) -> Waitpoint:
    statement = select(Waitpoint).where(Waitpoint.id == waitpoint_id)
    if for_update:
        statement = statement.with_for_update()
    waitpoint = session.scalar(statement)
    if waitpoint is None:
        raise WaitpointNotFoundError(f"waitpoint {waitpoint_id!r} not found")
    return waitpoint


def complete_token(session: Session, waitpoint_id: str, output: Any) -> Waitpoint:
    """Complete the TOKEN waitpoint `waitpoint_id` with `output`.

    Raises `WaitpointNotFoundError`, `WaitpointOutputError` for an output that
    is not JSON, and `WaitpointStateError` for a duration waitpoint or a token
    that is already COMPLETED or TIMED_OUT; the stored output never changes
    once set. The caller commits the session.
    """
    ensure_json_value(output, f"output for token {waitpoint_id!r}")
    waitpoint = get_waitpoint(session, waitpoint_id, for_update=True)
    if waitpoint.kind is not WaitpointKind.TOKEN:
        raise WaitpointStateError(
            f"waitpoint {waitpoint_id!r} is a {waitpoint.kind.value} waitpoint; "
            "only TOKEN waitpoints are completed by hand"
        )

    settle_waitpoint(waitpoint)
    if waitpoint.status is not WaitpointStatus.PENDING:
        when = waitpoint.completed_at.isoformat() if waitpoint.completed_at else "earlier"
        raise WaitpointStateError(
            f"token {waitpoint_id!r} is already {waitpoint.status.value} (at {when}); "
            "a token completes once and its output cannot be replaced"
        )

    waitpoint.status = WaitpointStatus.COMPLETED
    waitpoint.output = output
    waitpoint.completed_at = utc_now()
    logger.info("completed token %s of run %s", waitpoint.id, waitpoint.run_id)
    return waitpoint


def time_out_pending_waitpoints(session: Session, run_id: str) -> list[str]:
    """Mark every PENDING waitpoint of a run TIMED_OUT and return their ids.

    For a run that is canceled, so that none of its tokens looks live. The
    model has no CANCELED waitpoint status, and TIMED_OUT is the final status
    without an output. The caller commits the session.
    """
    pending = session.scalars(
        select(Waitpoint)
        .where(Waitpoint.run_id == run_id, Waitpoint.status == WaitpointStatus.PENDING)
        .with_for_update()
    ).all()
    now = utc_now()
    for waitpoint in pending:
        waitpoint.status = WaitpointStatus.TIMED_OUT
        waitpoint.completed_at = now
    return [waitpoint.id for waitpoint in pending]
