"""Platform routes for runs: trigger a task, then get, list, cancel and read the log of runs."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker
from starlette.concurrency import run_in_threadpool

from vmflow.api.errors import ConflictError, NotFoundError, retry_once_on_conflict
from vmflow.api.orchestration import Orchestrator, RunSpec
from vmflow.api.schemas import (
    CheckpointResponse,
    LogLineResponse,
    RunListResponse,
    RunLogResponse,
    RunResponse,
    TaskId,
    TriggerRequest,
    TriggerResponse,
    WaitpointResponse,
    error_responses,
)
from vmflow.api.waitpoints import time_out_pending_waitpoints
from vmflow.storage.db import session_scope
from vmflow.storage.models import (
    Deployment,
    DeploymentStatus,
    Project,
    RunLogLine,
    TaskRun,
    TaskRunStatus,
    utc_now,
)
from workflows.contract import run_workflow_id

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["runs"])

_ERRORS = error_responses(401, 404, 409, 413, 422, 503)
# The project a trigger without `project` or `deployment_id` runs on, as in `vmflow trigger`.
DEFAULT_PROJECT = "default"


def run_response(run: TaskRun) -> RunResponse:
    return RunResponse(
        id=run.id,
        task_id=run.task_id,
        deployment_id=run.deployment_id,
        status=run.status,
        payload=run.payload,
        output=run.output,
        error=run.error,
        attempt=run.attempt,
        runner_id=run.runner_id,
        instance_id=run.instance_id,
        created_at=run.created_at,
        updated_at=run.updated_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        workflow_id=run_workflow_id(run.id),
        waitpoints=[
            WaitpointResponse.model_validate(waitpoint, from_attributes=True)
            for waitpoint in sorted(run.waitpoints, key=lambda item: item.created_at)
        ],
        checkpoints=[
            CheckpointResponse.model_validate(checkpoint, from_attributes=True)
            for checkpoint in sorted(run.checkpoints, key=lambda item: item.created_at)
        ],
    )


def _load_run(session: Session, run_id: str) -> TaskRun:
    run = session.scalars(
        select(TaskRun)
        .where(TaskRun.id == run_id)
        .options(selectinload(TaskRun.waitpoints), selectinload(TaskRun.checkpoints))
    ).one_or_none()
    if run is None:
        raise NotFoundError("run_not_found", f"run {run_id!r} does not exist")
    return run


def _resolve_deployment(session: Session, body: TriggerRequest) -> Deployment:
    if body.deployment_id is not None:
        deployment = session.get(Deployment, body.deployment_id)
        if deployment is None:
            raise NotFoundError(
                "deployment_not_found", f"deployment {body.deployment_id!r} does not exist"
            )
        return deployment

    project_slug = body.project or DEFAULT_PROJECT
    project = session.scalars(select(Project).where(Project.slug == project_slug)).one_or_none()
    if project is None:
        raise NotFoundError("project_not_found", f"project {project_slug!r} does not exist")
    deployment = session.scalars(
        select(Deployment)
        .where(
            Deployment.project_id == project.id,
            Deployment.status == DeploymentStatus.DEPLOYED,
        )
        .order_by(Deployment.deployed_at.desc(), Deployment.created_at.desc())
        .limit(1)
    ).one_or_none()
    if deployment is None:
        raise NotFoundError(
            "deployment_not_found",
            f"project {project_slug!r} has no DEPLOYED deployment; run `vmflow deploy` first",
        )
    return deployment


def _create_run(session: Session, task_id: str, body: TriggerRequest) -> tuple[TaskRun, bool]:
    """Insert a PENDING run, or return the earlier run that has the same idempotency key."""
    if body.idempotency_key is not None:
        earlier = session.scalars(
            select(TaskRun).where(TaskRun.idempotency_key == body.idempotency_key)
        ).one_or_none()
        if earlier is not None:
            if earlier.task_id != task_id:
                raise ConflictError(
                    "idempotency_key_reused",
                    f"idempotency key {body.idempotency_key!r} already belongs to run "
                    f"{earlier.id} of task {earlier.task_id!r}; use a new key",
                )
            return earlier, False

    deployment = _resolve_deployment(session, body)
    if deployment.status != DeploymentStatus.DEPLOYED:
        raise ConflictError(
            "deployment_not_deployed",
            f"deployment {deployment.id} is {deployment.status.value}; trigger once it is DEPLOYED",
        )
    known_tasks = list(deployment.tasks or [])
    if task_id not in known_tasks:
        raise NotFoundError(
            "task_not_found",
            f"task {task_id!r} is not defined in deployment {deployment.id}; "
            f"known tasks: {', '.join(sorted(known_tasks)) or 'none'}",
        )

    run = TaskRun(
        deployment_id=deployment.id,
        task_id=task_id,
        payload=body.payload,
        idempotency_key=body.idempotency_key,
        status=TaskRunStatus.PENDING,
        created_at=utc_now(),
    )
    session.add(run)
    session.flush()
    return run, True


@router.post(
    "/tasks/{task_id}/trigger",
    response_model=TriggerResponse,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": TriggerResponse}, **_ERRORS},
    summary="Trigger a run of a task",
)
async def trigger_task(
    task_id: TaskId, body: TriggerRequest, request: Request, response: Response
) -> TriggerResponse:
    """Record a PENDING run and start its `RunExecutionWorkflow` (id `run-<run id>`)."""
    factory = request.app.state.session_factory

    def create() -> tuple[RunSpec, bool]:
        with session_scope(factory) as session:
            run, created = _create_run(session, task_id, body)
            spec = RunSpec(
                run_id=run.id, deployment_id=run.deployment_id, image=run.deployment.image
            )
            return spec, created

    spec, created = await run_in_threadpool(retry_once_on_conflict, create)
    run_id, deployment_id = spec.run_id, spec.deployment_id

    orchestrator: Orchestrator = request.app.state.orchestrator
    try:
        started = await orchestrator.start_run(spec, summary=f"{task_id} ({run_id})")
    except Exception:
        # Without its workflow a new run would stay PENDING forever, so it is
        # removed and the caller can retry with the same idempotency key.
        if created:
            await run_in_threadpool(_delete_run, factory, run_id)
        raise

    logger.info(
        "run %s of task %s on deployment %s: %s, workflow %s",
        run_id,
        task_id,
        deployment_id,
        "created" if created else "matched an idempotency key",
        "started" if started.started else "already running",
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return TriggerResponse(
        run_id=run_id,
        workflow_id=started.workflow_id,
        task_id=task_id,
        deployment_id=deployment_id,
        status=TaskRunStatus.PENDING,
        created=created,
    )


def _delete_run(factory: sessionmaker[Session], run_id: str) -> None:
    with session_scope(factory) as session:
        run = session.get(TaskRun, run_id)
        if run is not None:
            session.delete(run)


@router.get("/runs/{run_id}", response_model=RunResponse, responses=_ERRORS, summary="Get a run")
async def get_run(run_id: str, request: Request) -> RunResponse:
    def load() -> RunResponse:
        with session_scope(request.app.state.session_factory) as session:
            return run_response(_load_run(session, run_id))

    return await run_in_threadpool(load)


@router.get("/runs", response_model=RunListResponse, responses=_ERRORS, summary="List runs")
async def list_runs(
    request: Request,
    status_filter: Annotated[
        TaskRunStatus | None, Query(alias="status", description="Only runs in this status.")
    ] = None,
    task_id: Annotated[str | None, Query(description="Only runs of this task.")] = None,
    deployment_id: Annotated[str | None, Query(description="Only runs of this deployment.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Runs per page.")] = 50,
    offset: Annotated[int, Query(ge=0, description="Runs to skip, newest first.")] = 0,
) -> RunListResponse:
    def load() -> RunListResponse:
        query = select(TaskRun).options(
            selectinload(TaskRun.waitpoints), selectinload(TaskRun.checkpoints)
        )
        if status_filter is not None:
            query = query.where(TaskRun.status == status_filter)
        if task_id is not None:
            query = query.where(TaskRun.task_id == task_id)
        if deployment_id is not None:
            query = query.where(TaskRun.deployment_id == deployment_id)
        query = query.order_by(TaskRun.created_at.desc(), TaskRun.id.desc())
        with session_scope(request.app.state.session_factory) as session:
            # Fetching one row more than the page shows whether another page follows.
            rows = list(session.scalars(query.offset(offset).limit(limit + 1)))
            runs = [run_response(run) for run in rows[:limit]]
        return RunListResponse(runs=runs, next_offset=offset + limit if len(rows) > limit else None)

    return await run_in_threadpool(load)


@router.post(
    "/runs/{run_id}/cancel",
    response_model=RunResponse,
    status_code=status.HTTP_202_ACCEPTED,
    responses=_ERRORS,
    summary="Cancel a run",
)
async def cancel_run(run_id: str, request: Request) -> RunResponse:
    """Ask the run's workflow to cancel and time out the run's pending waitpoints.

    The run becomes CANCELED once its workflow has cleaned up. Its waitpoints
    are final at once, so no token of the run can be completed meanwhile.
    """
    factory = request.app.state.session_factory

    def load() -> RunResponse:
        with session_scope(factory) as session:
            return run_response(_load_run(session, run_id))

    run = await run_in_threadpool(load)
    if run.status.is_final:
        raise ConflictError(
            "run_finished",
            f"run {run_id} is {run.status.value}, so it cannot be canceled; "
            "only runs that have not finished can be",
        )
    orchestrator: Orchestrator = request.app.state.orchestrator
    await orchestrator.cancel_run(run_id)
    logger.info("requested cancellation of run %s (status %s)", run_id, run.status.value)

    # NOTE: a runner that still polls a waitpoint sees it TIMED_OUT, and its task
    # may fail and report that before the workflow has processed the
    # cancellation requested above.
    def close_waitpoints() -> RunResponse:
        with session_scope(factory) as session:
            closed = time_out_pending_waitpoints(session, run_id)
            if closed:
                logger.info(
                    "timed out %d pending waitpoints of canceled run %s: %s",
                    len(closed),
                    run_id,
                    ", ".join(closed),
                )
            session.flush()
            session.expire_all()
            return run_response(_load_run(session, run_id))

    return await run_in_threadpool(close_waitpoints)


@router.get(
    "/runs/{run_id}/logs",
    response_model=RunLogResponse,
    responses=_ERRORS,
    summary="Read a run's log",
)
async def read_run_log(
    run_id: str,
    request: Request,
    after: Annotated[int, Query(ge=0, description="Return lines with an id above this.")] = 0,
    limit: Annotated[int, Query(ge=1, le=5000, description="Lines per page.")] = 1000,
) -> RunLogResponse:
    def load() -> RunLogResponse:
        with session_scope(request.app.state.session_factory) as session:
            if session.get(TaskRun, run_id) is None:
                raise NotFoundError("run_not_found", f"run {run_id!r} does not exist")
            rows = session.scalars(
                select(RunLogLine)
                .where(RunLogLine.run_id == run_id, RunLogLine.id > after)
                .order_by(RunLogLine.id)
                .limit(limit)
            ).all()
            lines = [LogLineResponse.model_validate(row, from_attributes=True) for row in rows]
        return RunLogResponse(
            run_id=run_id, lines=lines, next_after=lines[-1].id if lines else None
        )

    return await run_in_threadpool(load)
