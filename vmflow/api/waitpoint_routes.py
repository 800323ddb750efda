"""Platform route that completes a token waitpoint, so the waiting run resumes with its output."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from vmflow.api.errors import ConflictError, InvalidRequestError, NotFoundError
from vmflow.api.orchestration import Orchestrator
from vmflow.api.schemas import WaitpointCompleteRequest, WaitpointResponse, error_responses
from vmflow.api.waitpoints import (
    WaitpointNotFoundError,
    WaitpointOutputError,
    WaitpointStateError,
    complete_token,
)
from vmflow.storage.db import session_scope
from vmflow.storage.models import TaskRun, Waitpoint, WaitpointStatus
from workflows import contract

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/waitpoints", tags=["waitpoints"])

_ERRORS = error_responses(401, 404, 409, 413, 422, 503)


def _claim(factory: sessionmaker[Session], token_id: str, output: object) -> WaitpointResponse:
    """Mark a PENDING token waitpoint COMPLETED, else raise 404, 409 or 422."""
    with session_scope(factory) as session:
        _require_live_run(session, token_id)
        try:
            waitpoint = complete_token(session, token_id, output)
        except WaitpointNotFoundError as error:
            raise NotFoundError(
                "waitpoint_not_found", f"waitpoint token {token_id!r} does not exist"
            ) from error
        except WaitpointOutputError as error:
            raise InvalidRequestError("invalid_output", str(error)) from error
        except WaitpointStateError as error:
            run = _run_of(session, token_id)
            state = f"; run {run.id} is {run.status.value}" if run is not None else ""
            raise ConflictError("waitpoint_not_pending", f"{error}{state}") from error
        session.flush()
        return WaitpointResponse.model_validate(waitpoint, from_attributes=True)


def _run_of(session: Session, token_id: str) -> TaskRun | None:
    waitpoint = session.get(Waitpoint, token_id)
    return session.get(TaskRun, waitpoint.run_id) if waitpoint is not None else None


def _require_live_run(session: Session, token_id: str) -> None:
    """Raise 409 `run_finished` when the token's run has finished, canceled included."""
    run = _run_of(session, token_id)
    if run is not None and run.status.is_final:
        raise ConflictError(
            "run_finished",
            f"run {run.id} of token {token_id!r} is {run.status.value}, "
            "so its tokens can no longer be completed",
        )


def _release(factory: sessionmaker[Session], token_id: str) -> None:
    """Undo `_claim` when the run did not receive the completion, so a retry can complete it."""
    with session_scope(factory) as session:
        session.execute(
            update(Waitpoint)
            .where(Waitpoint.id == token_id, Waitpoint.status == WaitpointStatus.COMPLETED)
            .values(status=WaitpointStatus.PENDING, output=None, completed_at=None)
            .execution_options(synchronize_session=False)
        )


@router.post(
    "/tokens/{token_id}/complete",
    response_model=WaitpointResponse,
    responses=_ERRORS,
    summary="Complete a token waitpoint",
)
async def complete_waitpoint_token(
    token_id: str, body: WaitpointCompleteRequest, request: Request
) -> WaitpointResponse:
    """Record the token's output and deliver it to the waiting run.

    A second completion of the same token gets 409 and changes nothing. If
    the run cannot be reached, the token stays PENDING and the call can be
    retried.
    """
    factory: sessionmaker[Session] = request.app.state.session_factory
    waitpoint = await run_in_threadpool(_claim, factory, token_id, body.output)

    orchestrator: Orchestrator = request.app.state.orchestrator
    try:
        result = await orchestrator.complete_waitpoint(
            waitpoint.run_id,
            contract.WaitpointCompleted(waitpoint_id=token_id, output=body.output),
        )
    except Exception:
        await run_in_threadpool(_release, factory, token_id)
        raise

    logger.info(
        "completed waitpoint token %s of run %s (run %s, accepted %s)",
        token_id,
        waitpoint.run_id,
        result.state,
        result.accepted,
    )
    return waitpoint
