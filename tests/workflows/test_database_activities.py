"""Database activities on SQLite and PostgreSQL, run in Temporal's activity test environment."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.database import (
    CheckpointInput,
    DatabaseActivities,
    DeploymentContextInput,
    DeploymentUpdateInput,
    RunStatusInput,
    WaitpointCompletionInput,
)
from tests.workflows.conftest import new_id, seed_deployment, seed_run
from vmflow.storage.db import session_scope
from vmflow.storage.models import (
    Deployment,
    DeploymentStatus,
    TaskRun,
    TaskRunCheckpoint,
    TaskRunStatus,
    TemplateMode,
    Waitpoint,
    WaitpointKind,
    WaitpointStatus,
    WorkloadType,
)


def activities(sessions: sessionmaker[Session]) -> DatabaseActivities:
    return DatabaseActivities(sessions, gateway_configured=True, shadow_rollout_pct=12.5)


def test_database_run_status_and_outcome(db_session_factory: sessionmaker[Session]) -> None:
    seeded = seed_deployment(db_session_factory)
    run_id = new_id("run")
    seed_run(db_session_factory, seeded.deployment_id, run_id)
    env = ActivityEnvironment()
    database = activities(db_session_factory)

    env.run(
        database.record_run_status,
        RunStatusInput(run_id, "EXECUTING", runner_id=f"{run_id}-r1", instance_id="inst-1"),
    )
    previous = env.run(
        database.record_run_status,
        RunStatusInput(run_id, "COMPLETED", instance_id="", output={"ok": 1}),
    )

    assert previous.previous_status == "EXECUTING"
    with session_scope(db_session_factory) as session:
        run = session.get(TaskRun, run_id)
        assert run is not None
        assert run.status == TaskRunStatus.COMPLETED
        assert run.runner_id == f"{run_id}-r1"
        assert run.instance_id is None
        assert run.output == {"ok": 1}
        assert run.started_at is not None
        assert run.finished_at is not None


def test_database_checkpoint_is_idempotent(db_session_factory: sessionmaker[Session]) -> None:
    seeded = seed_deployment(db_session_factory)
    run_id = new_id("run")
    seed_run(db_session_factory, seeded.deployment_id, run_id)
    env = ActivityEnvironment()
    database = activities(db_session_factory)
    checkpoint = CheckpointInput(run_id, "snap-1", f"{run_id}-r1", "wp-1", size_bytes=3 * 2**30)

    first = env.run(database.record_checkpoint, checkpoint)
    again = env.run(database.record_checkpoint, checkpoint)

    assert first.created is True
    assert again.created is False
    assert again.checkpoint_id == first.checkpoint_id
    with session_scope(db_session_factory) as session:
        rows = session.scalars(
            select(TaskRunCheckpoint).where(TaskRunCheckpoint.run_id == run_id)
        ).all()
        assert len(rows) == 1
        assert rows[0].size_bytes == 3 * 2**30


def test_database_missing_run_is_not_retried(db_session_factory: sessionmaker[Session]) -> None:
    env = ActivityEnvironment()

    with pytest.raises(ApplicationError) as failure:
        env.run(
            activities(db_session_factory).record_run_status,
            RunStatusInput("run-missing", "EXECUTING"),
        )

    assert failure.value.non_retryable is True
    assert failure.value.type == "NotFound"


def test_database_waitpoint_completes_once(db_session_factory: sessionmaker[Session]) -> None:
    seeded = seed_deployment(db_session_factory)
    run_id = new_id("run")
    seed_run(db_session_factory, seeded.deployment_id, run_id)
    with session_scope(db_session_factory) as session:
        session.add(Waitpoint(id=f"wp-{run_id}", run_id=run_id, kind=WaitpointKind.DURATION))
    env = ActivityEnvironment()
    database = activities(db_session_factory)

    first = env.run(database.complete_waitpoint, WaitpointCompletionInput(f"wp-{run_id}", 7))
    again = env.run(database.complete_waitpoint, WaitpointCompletionInput(f"wp-{run_id}", 8))

    assert first.updated is True
    assert again.updated is False
    with session_scope(db_session_factory) as session:
        waitpoint = session.get(Waitpoint, f"wp-{run_id}")
        assert waitpoint is not None
        assert waitpoint.status == WaitpointStatus.COMPLETED
        assert waitpoint.output == 7


def test_database_deployment_context_and_failure(
    db_session_factory: sessionmaker[Session],
) -> None:
    seeded = seed_deployment(
        db_session_factory,
        workload_type=WorkloadType.MICROVM,
        feature_flags={"hasComputeAccess": True},
    )
    env = ActivityEnvironment()
    database = activities(db_session_factory)

    context = env.run(
        database.load_deployment_context, DeploymentContextInput(seeded.deployment_id)
    )
    env.run(
        database.record_deployment,
        DeploymentUpdateInput(
            seeded.deployment_id,
            "FAILED",
            template_mode="required",
            error_name="TemplateCreationFailed",
            error_message="boom",
        ),
    )

    assert context.workload_type == "MICROVM"
    assert context.has_compute_access is True
    assert context.gateway_configured is True
    assert context.shadow_rollout_pct == 12.5
    assert context.image == seeded.image
    with session_scope(db_session_factory) as session:
        deployment = session.get(Deployment, seeded.deployment_id)
        assert deployment is not None
        assert deployment.status == DeploymentStatus.FAILED
        assert deployment.template_mode == TemplateMode.REQUIRED
        assert deployment.error_name == "TemplateCreationFailed"
        assert deployment.deployed_at is None
