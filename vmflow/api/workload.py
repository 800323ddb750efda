"""The workload API: what a runner inside an instance calls, version 1.

Mounted under `/api/v1/workload` and reached by runners only through their
instance's channel, which adds the run's workload token. Every route checks
that token and that the run id in the path is the token's run. Routes that
change a run require the run's current runner id, so a runner left behind by
a restore cannot change the run. Start and resume may also admit a runner of
a newer generation (see `_admit_runner`), never an older one.
docs/workload-api.md documents each route.

The database change of a request is committed before its `RunEvents` call.
When that call fails the route returns 503 and the runner retries, so every
route is safe to repeat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmflow.api.events import FinishDetails, RunEvents, SuspendDetails
from vmflow.api.json_values import JsonValue
from vmflow.api.tokens import WorkloadClaims, WorkloadTokenError, verify_workload_token
from vmflow.api.waitpoints import (
    WaitpointError,
    create_waitpoint,
    settle_waitpoint,
)
from vmflow.storage.db import session_scope
from vmflow.storage.models import (
    RunLogLine,
    TaskRun,
    TaskRunStatus,
    Waitpoint,
    WaitpointKind,
    WaitpointStatus,
    utc_now,
)

logger = logging.getLogger(__name__)

WORKLOAD_API_VERSION = 1
WORKLOAD_API_PREFIX = f"/api/v{WORKLOAD_API_VERSION}/workload"

MAX_LOG_LINES_PER_REQUEST = 1000
MAX_LOG_MESSAGE_CHARS = 16_384

# Statuses in which a runner may hold the run; a final status ends every runner.
_LIVE_STATUSES = frozenset(
    {
        TaskRunStatus.PENDING,
        TaskRunStatus.PROVISIONING,
        TaskRunStatus.EXECUTING,
        TaskRunStatus.SUSPENDING,
        TaskRunStatus.SUSPENDED,
        TaskRunStatus.RESTORING,
    }
)

ResultT = TypeVar("ResultT")


# ---------------------------------------------------------------------------
# Wiring


@dataclass(frozen=True)
class WorkloadState:
    """Dependencies of the workload routes, set by the app that mounts them."""

    session_factory: sessionmaker[Session]
    events: RunEvents
    secret: str


def install_workload_api(
    app: FastAPI, *, session_factory: sessionmaker[Session], events: RunEvents, secret: str
) -> None:
    """Mount the workload routes on `app`, keeping their dependencies in `app.state.workload`."""
    if not secret:
        raise ValueError("workload secret is empty; set VMFLOW_WORKLOAD_SECRET")
    app.state.workload = WorkloadState(
        session_factory=session_factory, events=events, secret=secret
    )
    app.include_router(router)


def _state(request: Request) -> WorkloadState:
    state = getattr(request.app.state, "workload", None)
    if not isinstance(state, WorkloadState):
        raise RuntimeError("the workload router is mounted without install_workload_api()")
    return state


def api_error(status_code: int, code: str, message: str) -> HTTPException:
    """Build the error every workload route raises: `{"detail": {"code", "message"}}`."""
    return HTTPException(status_code=status_code, detail={"code": code, "message": message})


# auto_error=False: a missing header must get the same 401 as a wrong token.
_bearer = HTTPBearer(auto_error=False, description="The run's workload token.")

_UNAUTHORIZED_DETAIL = {"code": "unauthorized", "message": "missing or invalid workload token"}


def workload_claims(
    request: Request,
    run_id: Annotated[str, Path(min_length=1, max_length=64)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> WorkloadClaims:
    """Return the token's claims; reject a missing or invalid token (401) or another run (403)."""
    state = _state(request)
    presented = credentials.credentials if credentials is not None else ""
    try:
        if not presented:
            raise WorkloadTokenError("no bearer token")
        claims = verify_workload_token(state.secret, presented)
    except WorkloadTokenError as error:
        logger.warning(
            "rejected workload request %s %s: %s", request.method, request.url.path, error
        )
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail=_UNAUTHORIZED_DETAIL,
            headers={"WWW-Authenticate": 'Bearer realm="vmflow-workload"'},
        ) from None
    if claims.run_id != run_id:
        raise api_error(
            status.HTTP_403_FORBIDDEN,
            "wrong_run",
            f"the workload token is for run {claims.run_id!r}, not {run_id!r}",
        )
    return claims


Claims = Annotated[WorkloadClaims, Depends(workload_claims)]
State = Annotated[WorkloadState, Depends(_state)]

router = APIRouter(prefix=WORKLOAD_API_PREFIX, tags=["workload"])


# ---------------------------------------------------------------------------
# Request and response bodies


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


RunnerId = Annotated[str, Field(min_length=1, max_length=128)]


class RunnerRequest(_Request):
    runner_id: RunnerId


class Execution(BaseModel):
    """The run a runner executes: task, payload, attempt and deployment."""

    run_id: str
    task_id: str
    payload: Any
    attempt: int
    deployment_id: str
    runner_id: str


class RunState(BaseModel):
    run_id: str
    status: TaskRunStatus
    runner_id: str | None


class LogLine(_Request):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    message: str = Field(max_length=MAX_LOG_MESSAGE_CHARS)
    ts: datetime = Field(description="When the line was logged; must carry a UTC offset.")


class LogsRequest(RunnerRequest):
    lines: list[LogLine] = Field(max_length=MAX_LOG_LINES_PER_REQUEST)


class LogsResponse(BaseModel):
    accepted: int


class WaitpointCreateRequest(RunnerRequest):
    """A waitpoint to create; exactly one of `duration_ms` and `until` for DURATION."""

    kind: WaitpointKind
    duration_ms: int | None = Field(default=None, ge=0)
    until: datetime | None = None
    timeout_ms: int | None = Field(default=None, gt=0)
    idempotency_key: str = Field(min_length=1, max_length=256)

    @model_validator(mode="after")
    def _check_kind_fields(self) -> WaitpointCreateRequest:
        if self.kind is WaitpointKind.DURATION:
            if (self.duration_ms is None) == (self.until is None):
                raise ValueError("a DURATION waitpoint takes exactly one of duration_ms and until")
            if self.timeout_ms is not None:
                raise ValueError("timeout_ms applies to TOKEN waitpoints only")
        elif self.duration_ms is not None or self.until is not None:
            raise ValueError("duration_ms and until apply to DURATION waitpoints only")
        if self.until is not None and self.until.utcoffset() is None:
            raise ValueError("until must carry a UTC offset, such as 2026-01-01T00:00:00Z")
        return self


class WaitpointResponse(BaseModel):
    id: str
    run_id: str
    kind: WaitpointKind
    status: WaitpointStatus
    resume_at: datetime | None
    timeout_at: datetime | None
    output: Any
    completed_at: datetime | None

    @classmethod
    def of(cls, waitpoint: Waitpoint) -> WaitpointResponse:
        return cls(
            id=waitpoint.id,
            run_id=waitpoint.run_id,
            kind=waitpoint.kind,
            status=waitpoint.status,
            resume_at=waitpoint.resume_at,
            timeout_at=waitpoint.timeout_at,
            output=waitpoint.output,
            completed_at=waitpoint.completed_at,
        )


class SuspendRequest(RunnerRequest):
    waitpoint_id: str = Field(min_length=1, max_length=64)
    execution_snapshot_id: int = Field(ge=0)


class SuspendResponse(BaseModel):
    """`suspended` is false when the waitpoint was already final: the runner continues at once."""

    suspended: bool
    waitpoint: WaitpointResponse


class ResumeRequest(RunnerRequest):
    waitpoint_id: str = Field(min_length=1, max_length=64)


class CompleteRequest(RunnerRequest):
    output: JsonValue = None


class TaskError(_Request):
    name: str = Field(min_length=1, max_length=256)
    message: str = Field(max_length=65_536)
    traceback: str | None = Field(default=None, max_length=262_144)


class FailRequest(RunnerRequest):
    error: TaskError


# ---------------------------------------------------------------------------
# Database steps, run in a worker thread


def _load_run(session: Session, run_id: str) -> TaskRun:
    run = session.scalar(select(TaskRun).where(TaskRun.id == run_id).with_for_update())
    if run is None:
        raise api_error(status.HTTP_404_NOT_FOUND, "run_not_found", f"run {run_id!r} not found")
    return run


def _require_live(run: TaskRun) -> None:
    if run.status not in _LIVE_STATUSES:
        raise api_error(
            status.HTTP_409_CONFLICT,
            "run_final",
            f"run {run.id!r} is already {run.status.value}; no runner may change it",
        )


def _require_current_runner(run: TaskRun, runner_id: str) -> None:
    if run.runner_id != runner_id:
        raise _stale_runner(run, runner_id)


def _stale_runner(run: TaskRun, runner_id: str) -> HTTPException:
    logger.warning(
        "rejected runner %s of run %s: the current runner is %s", runner_id, run.id, run.runner_id
    )
    return api_error(
        status.HTTP_409_CONFLICT,
        "stale_runner",
        f"runner {runner_id!r} is not the current runner of run {run.id!r} "
        f"(current: {run.runner_id!r}); a restored runner calls resume first",
    )


def runner_generation(run_id: str, runner_id: str) -> int | None:
    """Return n of a runner id `<run id>-r<n>`, or None for an id of another form."""
    prefix = f"{run_id}-r"
    suffix = runner_id.removeprefix(prefix)
    if suffix == runner_id or not suffix.isdigit():
        return None
    return int(suffix)


def _admit_runner(run: TaskRun, runner_id: str) -> None:
    """Make `runner_id` the run's current runner, or raise `stale_runner` (409).

    The workflow records each runner id in `TaskRun.runner_id` before it
    provisions or restores that runner's instance, so a runner that starts
    or resumes is normally already current. A runner of a higher generation
    (`<run id>-r<n>`) than the recorded one is admitted as well, for a
    database that has not caught up. Any other runner is stale: an older
    generation, or a different id that is not of that form.
    """
    current = run.runner_id
    if current is None or current == runner_id:
        run.runner_id = runner_id
        return
    generation = runner_generation(run.id, runner_id)
    current_generation = runner_generation(run.id, current)
    if generation is None or current_generation is None or generation <= current_generation:
        raise _stale_runner(run, runner_id)
    logger.info("runner %s replaces runner %s of run %s", runner_id, current, run.id)
    run.runner_id = runner_id


def _require_token_runner(claims: WorkloadClaims, runner_id: str) -> None:
    """Reject (409 `stale_runner`) a runner other than the one its token was issued for.

    A restore gives the instance a new token, so a token that names a runner
    is one more check that an old runner cannot act for the current one.
    """
    if claims.runner_id is not None and claims.runner_id != runner_id:
        logger.warning(
            "rejected runner %s of run %s: its workload token is for runner %s",
            runner_id,
            claims.run_id,
            claims.runner_id,
        )
        raise api_error(
            status.HTTP_409_CONFLICT,
            "stale_runner",
            f"runner {runner_id!r} is not the runner {claims.runner_id!r} that the "
            f"workload token of run {claims.run_id!r} was issued for",
        )


def _load_waitpoint(session: Session, run: TaskRun, waitpoint_id: str) -> Waitpoint:
    waitpoint = session.get(Waitpoint, waitpoint_id)
    if waitpoint is None or waitpoint.run_id != run.id:
        raise api_error(
            status.HTTP_404_NOT_FOUND,
            "waitpoint_not_found",
            f"waitpoint {waitpoint_id!r} not found in run {run.id!r}",
        )
    return waitpoint


async def _in_session(state: WorkloadState, step: Callable[[Session], ResultT]) -> ResultT:
    def run_step() -> ResultT:
        with session_scope(state.session_factory) as session:
            return step(session)

    return await run_in_threadpool(run_step)


async def _emit(description: str, run_id: str, call: Any) -> None:
    """Await one `RunEvents` call; a failure becomes a 503 the runner retries."""
    try:
        await call
    except Exception as error:
        logger.exception("failed to deliver %s of run %s", description, run_id)
        raise api_error(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "events_unavailable",
            f"recorded, but delivering {description} failed ({type(error).__name__}); retry",
        ) from error


# ---------------------------------------------------------------------------
# Routes


@router.post("/runs/{run_id}/start", response_model=Execution)
async def start_run(run_id: str, body: RunnerRequest, claims: Claims, state: State) -> Execution:
    """Make `runner_id` the run's runner, mark the run EXECUTING and return what to execute."""
    _require_token_runner(claims, body.runner_id)

    def step(session: Session) -> Execution:
        run = _load_run(session, run_id)
        _require_live(run)
        _admit_runner(run, body.runner_id)
        run.status = TaskRunStatus.EXECUTING
        run.started_at = run.started_at or utc_now()
        run.last_heartbeat_at = utc_now()
        return Execution(
            run_id=run.id,
            task_id=run.task_id,
            payload=run.payload,
            attempt=run.attempt,
            deployment_id=run.deployment_id,
            runner_id=body.runner_id,
        )

    execution = await _in_session(state, step)
    logger.info("runner %s started run %s (task %s)", body.runner_id, run_id, execution.task_id)
    await _emit(
        "runner_started",
        run_id,
        state.events.runner_started(run_id, body.runner_id, attempt=execution.attempt),
    )
    return execution


@router.post("/runs/{run_id}/heartbeat", response_model=RunState)
async def heartbeat(run_id: str, body: RunnerRequest, claims: Claims, state: State) -> RunState:
    """Record that the runner is alive; the returned status shows whether the run was canceled."""
    _require_token_runner(claims, body.runner_id)

    def step(session: Session) -> RunState:
        run = _load_run(session, run_id)
        _require_current_runner(run, body.runner_id)
        if run.status in _LIVE_STATUSES:
            run.last_heartbeat_at = utc_now()
        return RunState(run_id=run.id, status=run.status, runner_id=run.runner_id)

    return await _in_session(state, step)


@router.post("/runs/{run_id}/logs", response_model=LogsResponse)
async def append_logs(run_id: str, body: LogsRequest, claims: Claims, state: State) -> LogsResponse:
    """Append log lines to the run's log, tagged with the current runner that sent them."""
    _require_token_runner(claims, body.runner_id)
    for line in body.lines:
        if line.ts.utcoffset() is None:
            raise api_error(
                422,
                "invalid_log_line",
                f"log line timestamp {line.ts.isoformat()} has no UTC offset",
            )

    def step(session: Session) -> LogsResponse:
        run = _load_run(session, run_id)
        _require_current_runner(run, body.runner_id)
        for line in body.lines:
            session.add(
                RunLogLine(
                    run_id=run_id,
                    runner_id=body.runner_id,
                    level=line.level,
                    message=line.message,
                    logged_at=line.ts,
                )
            )
        return LogsResponse(accepted=len(body.lines))

    return await _in_session(state, step)


@router.post("/runs/{run_id}/waitpoints", response_model=WaitpointResponse)
async def create_run_waitpoint(
    run_id: str, body: WaitpointCreateRequest, claims: Claims, state: State
) -> WaitpointResponse:
    """Create a waitpoint, or return the earlier one with the same idempotency key."""
    _require_token_runner(claims, body.runner_id)

    def step(session: Session) -> WaitpointResponse:
        run = _load_run(session, run_id)
        _require_live(run)
        _require_current_runner(run, body.runner_id)

        now = utc_now()
        resume_at = None
        if body.kind is WaitpointKind.DURATION:
            resume_at = body.until or now + timedelta(milliseconds=body.duration_ms or 0)
        timeout_at = now + timedelta(milliseconds=body.timeout_ms) if body.timeout_ms else None
        try:
            waitpoint, created = create_waitpoint(
                session,
                run,
                kind=body.kind,
                idempotency_key=body.idempotency_key,
                resume_at=resume_at,
                timeout_at=timeout_at,
            )
        except WaitpointError as error:
            raise api_error(422, "invalid_waitpoint", str(error)) from error
        if waitpoint.kind is not body.kind:
            raise api_error(
                status.HTTP_409_CONFLICT,
                "idempotency_conflict",
                f"idempotency key {body.idempotency_key!r} already names "
                f"{waitpoint.kind.value} waitpoint {waitpoint.id!r}",
            )
        settle_waitpoint(waitpoint, now)
        if created:
            logger.info("run %s created %s waitpoint %s", run_id, body.kind.value, waitpoint.id)
        return WaitpointResponse.of(waitpoint)

    return await _in_session(state, step)


@router.get("/runs/{run_id}/waitpoints/{waitpoint_id}", response_model=WaitpointResponse)
async def get_run_waitpoint(
    run_id: str, waitpoint_id: str, claims: Claims, state: State
) -> WaitpointResponse:
    """Return a waitpoint of the run, completing a due duration or timing out an expired token."""

    def step(session: Session) -> WaitpointResponse:
        run = _load_run(session, run_id)
        waitpoint = _load_waitpoint(session, run, waitpoint_id)
        settle_waitpoint(waitpoint)
        return WaitpointResponse.of(waitpoint)

    return await _in_session(state, step)


@router.post("/runs/{run_id}/suspend", response_model=SuspendResponse)
async def request_suspend(
    run_id: str, body: SuspendRequest, claims: Claims, state: State
) -> SuspendResponse:
    """Record that the runner waits at a waitpoint and may be snapshotted (status SUSPENDING)."""
    _require_token_runner(claims, body.runner_id)

    def step(session: Session) -> tuple[SuspendResponse, SuspendDetails | None]:
        run = _load_run(session, run_id)
        _require_live(run)
        _require_current_runner(run, body.runner_id)
        waitpoint = _load_waitpoint(session, run, body.waitpoint_id)
        settle_waitpoint(waitpoint)
        if waitpoint.status is not WaitpointStatus.PENDING:
            return SuspendResponse(suspended=False, waitpoint=WaitpointResponse.of(waitpoint)), None

        run.status = TaskRunStatus.SUSPENDING
        details = SuspendDetails(
            waitpoint_id=waitpoint.id,
            execution_snapshot_id=body.execution_snapshot_id,
            waitpoint_kind=waitpoint.kind,
            resume_at=waitpoint.resume_at,
            timeout_at=waitpoint.timeout_at,
        )
        return SuspendResponse(suspended=True, waitpoint=WaitpointResponse.of(waitpoint)), details

    response, details = await _in_session(state, step)
    if details is not None:
        logger.info(
            "runner %s of run %s asks to suspend at waitpoint %s (execution snapshot %d)",
            body.runner_id,
            run_id,
            body.waitpoint_id,
            body.execution_snapshot_id,
        )
        await _emit(
            "suspend_requested",
            run_id,
            state.events.suspend_requested(run_id, body.runner_id, details),
        )
    return response


@router.post("/runs/{run_id}/resume", response_model=RunState)
async def resume_run(run_id: str, body: ResumeRequest, claims: Claims, state: State) -> RunState:
    """Make a runner woken inside a restored snapshot the run's runner (status EXECUTING)."""
    _require_token_runner(claims, body.runner_id)

    def step(session: Session) -> RunState:
        run = _load_run(session, run_id)
        _require_live(run)
        _load_waitpoint(session, run, body.waitpoint_id)
        _admit_runner(run, body.runner_id)
        run.status = TaskRunStatus.EXECUTING
        run.last_heartbeat_at = utc_now()
        return RunState(run_id=run.id, status=run.status, runner_id=run.runner_id)

    result = await _in_session(state, step)
    await _emit(
        "runner_resumed",
        run_id,
        state.events.runner_resumed(run_id, body.runner_id, waitpoint_id=body.waitpoint_id),
    )
    return result


def _finish(
    session: Session, run_id: str, runner_id: str, details: FinishDetails
) -> tuple[RunState, bool]:
    """Store the run's end; return its state and whether this call changed it."""
    run = _load_run(session, run_id)
    _require_current_runner(run, runner_id)

    # A retried complete or fail with the same result is a no-op, not a conflict.
    if run.status is details.status and run.output == details.output and run.error == details.error:
        return RunState(run_id=run.id, status=run.status, runner_id=run.runner_id), False
    _require_live(run)

    run.status = details.status
    run.output = details.output
    run.error = details.error
    run.finished_at = utc_now()
    return RunState(run_id=run.id, status=run.status, runner_id=run.runner_id), True


@router.post("/runs/{run_id}/complete", response_model=RunState)
async def complete_run(
    run_id: str, body: CompleteRequest, claims: Claims, state: State
) -> RunState:
    """Mark the run COMPLETED with the task's output."""
    _require_token_runner(claims, body.runner_id)
    details = FinishDetails(status=TaskRunStatus.COMPLETED, output=body.output)
    result, changed = await _in_session(
        state, lambda session: _finish(session, run_id, body.runner_id, details)
    )
    if changed:
        logger.info("runner %s completed run %s", body.runner_id, run_id)
    await _emit(
        "runner_finished", run_id, state.events.runner_finished(run_id, body.runner_id, details)
    )
    return result


@router.post("/runs/{run_id}/fail", response_model=RunState)
async def fail_run(run_id: str, body: FailRequest, claims: Claims, state: State) -> RunState:
    """Mark the run FAILED with the task's error {name, message, traceback}."""
    _require_token_runner(claims, body.runner_id)
    details = FinishDetails(status=TaskRunStatus.FAILED, error=body.error.model_dump())
    result, changed = await _in_session(
        state, lambda session: _finish(session, run_id, body.runner_id, details)
    )
    if changed:
        logger.info(
            "runner %s failed run %s: %s: %s",
            body.runner_id,
            run_id,
            body.error.name,
            body.error.message,
        )
    await _emit(
        "runner_finished", run_id, state.events.runner_finished(run_id, body.runner_id, details)
    )
    return result
