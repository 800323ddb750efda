"""Storage models on SQLite and PostgreSQL: the run chain, enums, uniqueness, cascades."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from vmflow.storage.db import session_scope
from vmflow.storage.models import (
    CheckpointType,
    Deployment,
    DeploymentStatus,
    Organization,
    Project,
    RunLogLine,
    TaskRun,
    TaskRunCheckpoint,
    TaskRunStatus,
    TemplateMode,
    Waitpoint,
    WaitpointKind,
    WaitpointStatus,
    WorkerInstanceGroup,
    WorkloadType,
)

FIVE_GIB = 5 * 1024**3


def make_chain(session: Session, suffix: str = "") -> dict[str, Any]:
    """Organization → MICROVM group → project → deployment → run → waitpoint → checkpoint."""
    org = Organization(slug=f"acme{suffix}", feature_flags={"computeSnapshots": True, "n": 3})
    group = WorkerInstanceGroup(name=f"microvms{suffix}", workload_type=WorkloadType.MICROVM)
    project = Project(organization=org, slug=f"app{suffix}", default_worker_group=group)
    deployment = Deployment(
        project=project,
        version="20260101.1",
        image="registry:5000/team/app:1",
        template_mode=TemplateMode.SHADOW,
    )
    run = TaskRun(
        deployment=deployment,
        task_id="send-email",
        payload={"to": ["a@example.com"], "retry": {"max": 3}, "note": "héllo"},
        idempotency_key=f"key{suffix}",
    )
    waitpoint = Waitpoint(
        run=run,
        kind=WaitpointKind.DURATION,
        resume_at=datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC),
    )
    checkpoint = TaskRunCheckpoint(
        run=run,
        type=CheckpointType.COMPUTE,
        location="snap_0123456789abcdef",
        runner_id="runner_1",
        size_bytes=FIVE_GIB,
    )
    session.add_all([org, group, project, deployment, run, waitpoint, checkpoint])
    session.flush()  # ids are assigned on insert
    session.add(RunLogLine(run_id=run.id, message="started"))
    checkpoint.waitpoint_id = waitpoint.id
    session.flush()
    return {
        "org": org,
        "group": group,
        "project": project,
        "deployment": deployment,
        "run": run,
        "waitpoint": waitpoint,
        "checkpoint": checkpoint,
    }


def test_run_chain_round_trips(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        ids = {name: row.id for name, row in make_chain(session).items()}

    with db_session_factory() as session:
        org = session.get_one(Organization, ids["org"])
        assert org.feature_flags == {"computeSnapshots": True, "n": 3}
        assert org.has_feature("computeSnapshots")
        assert not org.has_feature("other")
        assert org.id.startswith("org_")
        assert [p.id for p in org.projects] == [ids["project"]]

        group = session.get_one(WorkerInstanceGroup, ids["group"])
        assert group.workload_type is WorkloadType.MICROVM

        project = session.get_one(Project, ids["project"])
        assert project.default_worker_group is not None
        assert project.default_worker_group.id == ids["group"]
        assert project.organization.slug == "acme"

        deployment = session.get_one(Deployment, ids["deployment"])
        assert deployment.status is DeploymentStatus.PENDING
        assert deployment.template_mode is TemplateMode.SHADOW
        assert deployment.project.id == ids["project"]

        run = session.get_one(TaskRun, ids["run"])
        assert run.status is TaskRunStatus.PENDING
        assert run.attempt == 1
        assert run.payload == {"to": ["a@example.com"], "retry": {"max": 3}, "note": "héllo"}
        assert run.output is None
        assert run.deployment.id == ids["deployment"]

        (waitpoint,) = run.waitpoints
        assert waitpoint.id == ids["waitpoint"]
        assert waitpoint.kind is WaitpointKind.DURATION
        assert waitpoint.status is WaitpointStatus.PENDING
        assert waitpoint.resume_at == datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)

        (checkpoint,) = run.checkpoints
        assert checkpoint.type is CheckpointType.COMPUTE
        assert checkpoint.location == "snap_0123456789abcdef"
        assert checkpoint.size_bytes == FIVE_GIB
        assert checkpoint.waitpoint_id == ids["waitpoint"]

        lines = session.scalars(select(RunLogLine).where(RunLogLine.run_id == run.id)).all()
        assert [(line.message, line.level) for line in lines] == [("started", "INFO")]


def test_enums_are_stored_as_their_values(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        chain = make_chain(session)
        ids = {name: row.id for name, row in chain.items()}

    with db_session_factory() as session:
        stored = session.execute(
            text("SELECT template_mode, status FROM deployments WHERE id = :id"),
            {"id": ids["deployment"]},
        ).one()
        assert tuple(stored) == ("shadow", "PENDING")
        assert session.execute(
            text("SELECT type FROM task_run_checkpoints WHERE id = :id"),
            {"id": ids["checkpoint"]},
        ).scalar_one() == ("COMPUTE")
        assert session.execute(
            text("SELECT workload_type FROM worker_instance_groups WHERE id = :id"),
            {"id": ids["group"]},
        ).scalar_one() == ("MICROVM")


ENUM_COLUMNS: list[tuple[type[StrEnum], str, str]] = [
    (WorkloadType, "group", "workload_type"),
    (DeploymentStatus, "deployment", "status"),
    (TemplateMode, "deployment", "template_mode"),
    (TaskRunStatus, "run", "status"),
    (WaitpointKind, "waitpoint", "kind"),
    (WaitpointStatus, "waitpoint", "status"),
    (CheckpointType, "checkpoint", "type"),
]


@pytest.mark.parametrize(("enum_type", "row", "column"), ENUM_COLUMNS)
def test_every_enum_member_round_trips(
    db_session_factory: sessionmaker[Session],
    enum_type: type[StrEnum],
    row: str,
    column: str,
) -> None:
    with session_scope(db_session_factory) as session:
        chain = make_chain(session)
        target = chain[row]
        model, row_id = type(target), target.id

    for member in enum_type:
        with session_scope(db_session_factory) as session:
            setattr(session.get_one(model, row_id), column, member)
        with db_session_factory() as session:
            value = getattr(session.get_one(model, row_id), column)
            assert value is member


def test_enum_accepts_its_value_string(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        run_id = make_chain(session)["run"].id
    with session_scope(db_session_factory) as session:
        session.get_one(TaskRun, run_id).status = "EXECUTING"  # type: ignore[assignment]
    with db_session_factory() as session:
        assert session.get_one(TaskRun, run_id).status is TaskRunStatus.EXECUTING


@pytest.mark.parametrize(
    ("row", "column", "value"),
    [
        ("run", "status", "RUNNING"),
        ("run", "status", "pending"),  # values are case-sensitive
        ("deployment", "template_mode", "SHADOW"),  # the value is "shadow"
        ("checkpoint", "type", "FIRECRACKER"),
        ("group", "workload_type", ""),
    ],
)
def test_invalid_enum_string_is_rejected(
    db_session_factory: sessionmaker[Session], row: str, column: str, value: str
) -> None:
    with session_scope(db_session_factory) as session:
        target = make_chain(session)[row]
        model, row_id = type(target), target.id

    with db_session_factory() as session:
        setattr(session.get_one(model, row_id), column, value)
        with pytest.raises(StatementError) as caught:
            session.flush()
        assert isinstance(caught.value.orig, LookupError)
        assert repr(value) in str(caught.value.orig)


def test_unknown_enum_value_in_the_database_is_not_read_silently(
    db_session_factory: sessionmaker[Session],
) -> None:
    with session_scope(db_session_factory) as session:
        run_id = make_chain(session)["run"].id
        session.execute(
            text("UPDATE task_runs SET status = 'BOGUS' WHERE id = :id"), {"id": run_id}
        )

    with db_session_factory() as session, pytest.raises(LookupError, match="BOGUS"):
        session.get_one(TaskRun, run_id)


def test_status_finality() -> None:
    final = {status for status in TaskRunStatus if status.is_final}
    assert final == {
        TaskRunStatus.COMPLETED,
        TaskRunStatus.FAILED,
        TaskRunStatus.CANCELED,
        TaskRunStatus.TIMED_OUT,
    }


def _expect_integrity_error(factory: sessionmaker[Session], rows: list[Any]) -> None:
    with factory() as session:
        session.add_all(rows)
        with pytest.raises(IntegrityError):
            session.flush()


def test_organization_slug_is_unique(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        session.add(Organization(slug="acme"))
    _expect_integrity_error(db_session_factory, [Organization(slug="acme")])


def test_worker_group_name_is_unique(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        session.add(WorkerInstanceGroup(name="microvms"))
    _expect_integrity_error(db_session_factory, [WorkerInstanceGroup(name="microvms")])


def test_project_slug_is_unique(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        org_id = make_chain(session)["org"].id
    _expect_integrity_error(db_session_factory, [Project(organization_id=org_id, slug="app")])


def test_deployment_version_is_unique_per_project(
    db_session_factory: sessionmaker[Session],
) -> None:
    with session_scope(db_session_factory) as session:
        first = make_chain(session)["project"].id
        second = make_chain(session, suffix="-2")["project"].id

    # The same version in another project is fine.
    with session_scope(db_session_factory) as session:
        session.add(Deployment(project_id=second, version="1.0", image="a:1"))
        session.add(Deployment(project_id=first, version="1.0", image="a:1"))
    _expect_integrity_error(
        db_session_factory, [Deployment(project_id=first, version="1.0", image="a:2")]
    )


def test_run_idempotency_key_is_unique(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        deployment_id = make_chain(session)["deployment"].id
        # Runs without a key do not collide.
        session.add_all([TaskRun(deployment_id=deployment_id, task_id="t") for _ in range(2)])
    _expect_integrity_error(
        db_session_factory,
        [TaskRun(deployment_id=deployment_id, task_id="t", idempotency_key="key")],
    )


def test_waitpoint_idempotency_key_is_unique_per_run(
    db_session_factory: sessionmaker[Session],
) -> None:
    with session_scope(db_session_factory) as session:
        run_id = make_chain(session)["run"].id
        other_run_id = make_chain(session, suffix="-2")["run"].id
        session.add_all(
            [
                Waitpoint(run_id=run_id, kind=WaitpointKind.TOKEN, idempotency_key="wk"),
                Waitpoint(run_id=other_run_id, kind=WaitpointKind.TOKEN, idempotency_key="wk"),
                Waitpoint(run_id=run_id, kind=WaitpointKind.TOKEN),  # NULL keys never collide
            ]
        )
    _expect_integrity_error(
        db_session_factory,
        [Waitpoint(run_id=run_id, kind=WaitpointKind.TOKEN, idempotency_key="wk")],
    )


def test_foreign_keys_are_enforced(db_session_factory: sessionmaker[Session]) -> None:
    _expect_integrity_error(
        db_session_factory, [Project(organization_id="org_missing", slug="orphan")]
    )


def _count(session: Session, model: type[Any]) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def test_deleting_an_organization_cascades_to_everything_below(
    db_session_factory: sessionmaker[Session],
) -> None:
    with session_scope(db_session_factory) as session:
        doomed = make_chain(session)["org"].id
        make_chain(session, suffix="-kept")

    with session_scope(db_session_factory) as session:
        org = session.get_one(Organization, doomed)
        assert len(org.projects) == 1  # loaded children must not block the delete
        session.delete(org)

    with db_session_factory() as session:
        assert _count(session, Organization) == 1
        for model in (Project, Deployment, TaskRun, Waitpoint, TaskRunCheckpoint, RunLogLine):
            assert _count(session, model) == 1, model.__name__
        # worker groups belong to no organization
        assert _count(session, WorkerInstanceGroup) == 2


def test_deleting_a_run_in_sql_cascades_to_its_rows(
    db_session_factory: sessionmaker[Session],
) -> None:
    with session_scope(db_session_factory) as session:
        run_id = make_chain(session)["run"].id

    with session_scope(db_session_factory) as session:
        session.execute(delete(TaskRun).where(TaskRun.id == run_id))

    with db_session_factory() as session:
        for model in (TaskRun, Waitpoint, TaskRunCheckpoint, RunLogLine):
            assert _count(session, model) == 0, model.__name__
        assert _count(session, Deployment) == 1


def test_deleting_a_run_through_the_orm_removes_its_waitpoints(
    db_session_factory: sessionmaker[Session],
) -> None:
    with session_scope(db_session_factory) as session:
        run_id = make_chain(session)["run"].id

    with session_scope(db_session_factory) as session:
        run = session.get_one(TaskRun, run_id)
        assert len(run.waitpoints) == 1 and len(run.checkpoints) == 1
        session.delete(run)

    with db_session_factory() as session:
        for model in (TaskRun, Waitpoint, TaskRunCheckpoint, RunLogLine):
            assert _count(session, model) == 0, model.__name__


def test_deleting_a_worker_group_unsets_project_defaults(
    db_session_factory: sessionmaker[Session],
) -> None:
    with session_scope(db_session_factory) as session:
        chain = make_chain(session)
        group_id, project_id = chain["group"].id, chain["project"].id

    with session_scope(db_session_factory) as session:
        session.execute(delete(WorkerInstanceGroup).where(WorkerInstanceGroup.id == group_id))

    with db_session_factory() as session:
        project = session.get_one(Project, project_id)
        assert project.default_worker_group_id is None


def test_timestamps_are_aware_utc_on_every_backend(
    db_session_factory: sessionmaker[Session],
) -> None:
    plus_two = timezone(timedelta(hours=2))
    with session_scope(db_session_factory) as session:
        run = make_chain(session)["run"]
        run.started_at = datetime(2026, 3, 1, 14, 30, 15, 999999, tzinfo=plus_two)
        run_id = run.id

    with db_session_factory() as session:
        run = session.get_one(TaskRun, run_id)
        assert run.started_at == datetime(2026, 3, 1, 12, 30, 15, 999999, tzinfo=UTC)
        assert run.started_at is not None and run.started_at.utcoffset() == timedelta(0)
        assert run.created_at.tzinfo is not None
        assert abs(datetime.now(UTC) - run.created_at) < timedelta(minutes=5)


def test_naive_timestamps_are_rejected(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        run_id = make_chain(session)["run"].id

    with db_session_factory() as session:
        session.get_one(TaskRun, run_id).finished_at = datetime(2026, 1, 1)
        with pytest.raises(StatementError, match="naive datetime"):
            session.flush()


def test_updated_at_moves_on_update(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        run = make_chain(session)["run"]
        run_id, created = run.id, run.updated_at

    with session_scope(db_session_factory) as session:
        session.get_one(TaskRun, run_id).status = TaskRunStatus.EXECUTING

    with db_session_factory() as session:
        assert session.get_one(TaskRun, run_id).updated_at > created


def test_log_line_ids_increase(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        run_id = make_chain(session)["run"].id
        session.add_all([RunLogLine(run_id=run_id, message=f"line {i}") for i in range(3)])

    with db_session_factory() as session:
        lines = session.scalars(select(RunLogLine).order_by(RunLogLine.id)).all()
        assert [line.message for line in lines] == ["started", "line 0", "line 1", "line 2"]
        assert all(isinstance(line.id, int) for line in lines)
        assert len({line.id for line in lines}) == 4
