"""Deployments record the ids of the tasks their image defines.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

The supervisor API rejects a trigger of a task the deployment does not
define; rows created before this revision have no list (NULL) and accept no
task until they are deployed again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("tasks", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("tasks")
