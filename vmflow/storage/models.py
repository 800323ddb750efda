"""SQLAlchemy 2 models of what other systems and people query about runs.

Temporal's history is the source of truth for execution; these rows mirror it
for the API, the CLI and operators.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names, the same on SQLite and PostgreSQL, so later
# migrations can drop or alter a constraint by name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Return a readable random id such as `run_3f2a…`."""
    return f"{prefix}_{uuid.uuid4().hex}"


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL keeps the offset (`timestamp with time zone`) but SQLite stores
    text without one and hands back naive values; this type converts aware
    values to UTC on the way in, rejects naive ones, and marks values read
    back as UTC, so both backends return the same aware datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}; pass an aware one such as utc_now()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JSON}


def _enum(enum_type: type[StrEnum], name: str) -> Enum:
    # Stored as strings (no native ENUM type) so SQLite and PostgreSQL migrate alike.
    return Enum(
        enum_type,
        name=name,
        native_enum=False,
        length=32,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class WorkloadType(StrEnum):
    CONTAINER = "CONTAINER"
    MICROVM = "MICROVM"


class DeploymentStatus(StrEnum):
    PENDING = "PENDING"
    BUILDING_TEMPLATE = "BUILDING_TEMPLATE"
    DEPLOYED = "DEPLOYED"
    FAILED = "FAILED"


class TemplateMode(StrEnum):
    REQUIRED = "required"
    SHADOW = "shadow"
    SKIP = "skip"


class TaskRunStatus(StrEnum):
    PENDING = "PENDING"
    PROVISIONING = "PROVISIONING"
    EXECUTING = "EXECUTING"
    SUSPENDING = "SUSPENDING"
    SUSPENDED = "SUSPENDED"
    RESTORING = "RESTORING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_RUN_STATUSES


_FINAL_RUN_STATUSES = frozenset(
    {TaskRunStatus.COMPLETED, TaskRunStatus.FAILED, TaskRunStatus.CANCELED, TaskRunStatus.TIMED_OUT}
)


class WaitpointKind(StrEnum):
    DURATION = "DURATION"
    TOKEN = "TOKEN"


class WaitpointStatus(StrEnum):
    PENDING = "PENDING"
    COMPLETED = "COMPLETED"
    TIMED_OUT = "TIMED_OUT"


class CheckpointType(StrEnum):
    DOCKER = "DOCKER"
    KUBERNETES = "KUBERNETES"
    COMPUTE = "COMPUTE"


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("org"))
    slug: Mapped[str] = mapped_column(String(128), unique=True)
    feature_flags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    # The database deletes children (ON DELETE CASCADE); passive_deletes keeps the
    # ORM from nulling their foreign keys first, which NOT NULL would reject.
    projects: Mapped[list[Project]] = relationship(
        back_populates="organization", cascade="all, delete-orphan", passive_deletes=True
    )

    def has_feature(self, flag: str) -> bool:
        return bool((self.feature_flags or {}).get(flag))


class WorkerInstanceGroup(Base):
    __tablename__ = "worker_instance_groups"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("wig"))
    name: Mapped[str] = mapped_column(String(128), unique=True)
    workload_type: Mapped[WorkloadType] = mapped_column(
        _enum(WorkloadType, "workload_type"), default=WorkloadType.CONTAINER
    )
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("proj"))
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    slug: Mapped[str] = mapped_column(String(128), unique=True)
    default_worker_group_id: Mapped[str | None] = mapped_column(
        ForeignKey("worker_instance_groups.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    organization: Mapped[Organization] = relationship(back_populates="projects")
    default_worker_group: Mapped[WorkerInstanceGroup | None] = relationship()


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("dep"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(64))
    image: Mapped[str] = mapped_column(String(512))
    status: Mapped[DeploymentStatus] = mapped_column(
        _enum(DeploymentStatus, "deployment_status"), default=DeploymentStatus.PENDING
    )
    template_mode: Mapped[TemplateMode | None] = mapped_column(_enum(TemplateMode, "template_mode"))
    template_id: Mapped[str | None] = mapped_column(String(128))
    tasks: Mapped[list[str] | None] = mapped_column(JSON)  # task ids the image defines
    error_name: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    deployed_at: Mapped[datetime | None]

    project: Mapped[Project] = relationship()

    __table_args__ = (
        Index("ix_deployments_project_version", "project_id", "version", unique=True),
    )


class TaskRun(Base):
    __tablename__ = "task_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("run"))
    deployment_id: Mapped[str] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), index=True
    )
    task_id: Mapped[str] = mapped_column(String(256))
    status: Mapped[TaskRunStatus] = mapped_column(
        _enum(TaskRunStatus, "task_run_status"), default=TaskRunStatus.PENDING
    )
    payload: Mapped[Any | None] = mapped_column(JSON)
    output: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    runner_id: Mapped[str | None] = mapped_column(String(128))
    instance_id: Mapped[str | None] = mapped_column(String(128))
    idempotency_key: Mapped[str | None] = mapped_column(String(256), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    last_heartbeat_at: Mapped[datetime | None]

    deployment: Mapped[Deployment] = relationship()
    waitpoints: Mapped[list[Waitpoint]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )
    checkpoints: Mapped[list[TaskRunCheckpoint]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (Index("ix_task_runs_status", "status"),)


class Waitpoint(Base):
    __tablename__ = "waitpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("wp"))
    run_id: Mapped[str] = mapped_column(ForeignKey("task_runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[WaitpointKind] = mapped_column(_enum(WaitpointKind, "waitpoint_kind"))
    status: Mapped[WaitpointStatus] = mapped_column(
        _enum(WaitpointStatus, "waitpoint_status"), default=WaitpointStatus.PENDING
    )
    resume_at: Mapped[datetime | None]
    timeout_at: Mapped[datetime | None]
    output: Mapped[Any | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    completed_at: Mapped[datetime | None]

    run: Mapped[TaskRun] = relationship(back_populates="waitpoints")

    __table_args__ = (
        Index("ix_waitpoints_run_idempotency", "run_id", "idempotency_key", unique=True),
    )


class TaskRunCheckpoint(Base):
    __tablename__ = "task_run_checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ckpt"))
    run_id: Mapped[str] = mapped_column(ForeignKey("task_runs.id", ondelete="CASCADE"), index=True)
    type: Mapped[CheckpointType] = mapped_column(_enum(CheckpointType, "checkpoint_type"))
    location: Mapped[str] = mapped_column(String(512))
    runner_id: Mapped[str | None] = mapped_column(String(128))
    waitpoint_id: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)  # snapshots exceed 2 GiB
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    run: Mapped[TaskRun] = relationship(back_populates="checkpoints")


class RunLogLine(Base):
    __tablename__ = "run_log_lines"

    # 64-bit on PostgreSQL; SQLite only autoincrements a column declared INTEGER.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[str] = mapped_column(ForeignKey("task_runs.id", ondelete="CASCADE"), index=True)
    runner_id: Mapped[str | None] = mapped_column(String(128))
    level: Mapped[str] = mapped_column(String(16), default="INFO")
    message: Mapped[str] = mapped_column(Text)
    logged_at: Mapped[datetime] = mapped_column(default=utc_now)
