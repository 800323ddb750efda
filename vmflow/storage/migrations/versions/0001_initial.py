"""Initial schema: organizations, worker groups, projects, deployments, runs.

Revision ID: 0001
Revises:
Create Date: 2026-12-04

Enums are stored as VARCHAR(32) without a CHECK constraint (SQLAlchemy
validates the values), so adding a member needs no migration. Timestamps are
`timestamp with time zone` on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.Column[str]:
    return sa.Column("id", sa.String(64), nullable=False)


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, length=32)


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "organizations",
        _id(),
        sa.Column("slug", sa.String(128), nullable=False),
        sa.Column("feature_flags", sa.JSON(), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
        sa.UniqueConstraint("slug", name=op.f("uq_organizations_slug")),
    )
    op.create_table(
        "worker_instance_groups",
        _id(),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("workload_type", _enum("workload_type", "CONTAINER", "MICROVM"), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker_instance_groups")),
        sa.UniqueConstraint("name", name=op.f("uq_worker_instance_groups_name")),
    )
    op.create_table(
        "projects",
        _id(),
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("slug", sa.String(128), nullable=False),
        sa.Column("default_worker_group_id", sa.String(64), nullable=True),
        _timestamp("created_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_projects_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["default_worker_group_id"],
            ["worker_instance_groups.id"],
            name=op.f("fk_projects_default_worker_group_id_worker_instance_groups"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
        sa.UniqueConstraint("slug", name=op.f("uq_projects_slug")),
    )
    op.create_index(op.f("ix_projects_organization_id"), "projects", ["organization_id"])

    op.create_table(
        "deployments",
        _id(),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("image", sa.String(512), nullable=False),
        sa.Column(
            "status",
            _enum("deployment_status", "PENDING", "BUILDING_TEMPLATE", "DEPLOYED", "FAILED"),
            nullable=False,
        ),
        sa.Column(
            "template_mode", _enum("template_mode", "required", "shadow", "skip"), nullable=True
        ),
        sa.Column("template_id", sa.String(128), nullable=True),
        sa.Column("error_name", sa.String(128), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("deployed_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_deployments_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
    )
    op.create_index(
        "ix_deployments_project_version", "deployments", ["project_id", "version"], unique=True
    )

    op.create_table(
        "task_runs",
        _id(),
        sa.Column("deployment_id", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(256), nullable=False),
        sa.Column(
            "status",
            _enum(
                "task_run_status",
                "PENDING",
                "PROVISIONING",
                "EXECUTING",
                "SUSPENDING",
                "SUSPENDED",
                "RESTORING",
                "COMPLETED",
                "FAILED",
                "CANCELED",
                "TIMED_OUT",
            ),
            nullable=False,
        ),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("runner_id", sa.String(128), nullable=True),
        sa.Column("instance_id", sa.String(128), nullable=True),
        sa.Column("idempotency_key", sa.String(256), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("updated_at", nullable=False),
        _timestamp("started_at", nullable=True),
        _timestamp("finished_at", nullable=True),
        _timestamp("last_heartbeat_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name=op.f("fk_task_runs_deployment_id_deployments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_runs")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_task_runs_idempotency_key")),
    )
    op.create_index(op.f("ix_task_runs_deployment_id"), "task_runs", ["deployment_id"])
    op.create_index("ix_task_runs_status", "task_runs", ["status"])

    op.create_table(
        "waitpoints",
        _id(),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("kind", _enum("waitpoint_kind", "DURATION", "TOKEN"), nullable=False),
        sa.Column(
            "status",
            _enum("waitpoint_status", "PENDING", "COMPLETED", "TIMED_OUT"),
            nullable=False,
        ),
        _timestamp("resume_at", nullable=True),
        _timestamp("timeout_at", nullable=True),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("idempotency_key", sa.String(256), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("completed_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["task_runs.id"],
            name=op.f("fk_waitpoints_run_id_task_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_waitpoints")),
    )
    op.create_index(op.f("ix_waitpoints_run_id"), "waitpoints", ["run_id"])
    op.create_index(
        "ix_waitpoints_run_idempotency", "waitpoints", ["run_id", "idempotency_key"], unique=True
    )

    op.create_table(
        "task_run_checkpoints",
        _id(),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column(
            "type", _enum("checkpoint_type", "DOCKER", "KUBERNETES", "COMPUTE"), nullable=False
        ),
        sa.Column("location", sa.String(512), nullable=False),
        sa.Column("runner_id", sa.String(128), nullable=True),
        sa.Column("waitpoint_id", sa.String(64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        _timestamp("created_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["task_runs.id"],
            name=op.f("fk_task_run_checkpoints_run_id_task_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_run_checkpoints")),
    )
    op.create_index(op.f("ix_task_run_checkpoints_run_id"), "task_run_checkpoints", ["run_id"])

    op.create_table(
        "run_log_lines",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("runner_id", sa.String(128), nullable=True),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        _timestamp("logged_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["task_runs.id"],
            name=op.f("fk_run_log_lines_run_id_task_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_log_lines")),
    )
    op.create_index(op.f("ix_run_log_lines_run_id"), "run_log_lines", ["run_id"])


def downgrade() -> None:
    # Children first; dropping a table drops its indexes with it.
    for table in (
        "run_log_lines",
        "task_run_checkpoints",
        "waitpoints",
        "task_runs",
        "deployments",
        "projects",
        "worker_instance_groups",
        "organizations",
    ):
        op.drop_table(table)
