"""Migrations on SQLite and PostgreSQL: up, down, up again, and no drift from the models."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, inspect, text

from tests.conftest import postgres_schema
from vmflow.storage import migrate
from vmflow.storage.db import DatabaseError, create_engine_from_url
from vmflow.storage.models import Base


@pytest.fixture
def engine(empty_database_url: str) -> Iterator[Engine]:
    engine = create_engine_from_url(empty_database_url)
    yield engine
    engine.dispose()


def revisions_in_order() -> list[str]:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    return [rev.revision for rev in reversed(list(script.walk_revisions("base", "heads")))]


def schema_diffs(engine: Engine, metadata: MetaData = Base.metadata) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def table_names(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(inspect(connection).get_table_names())


MODEL_TABLES = set(Base.metadata.tables)


def test_one_linear_history_ending_at_head() -> None:
    revisions = revisions_in_order()
    assert revisions[0] == "0001"
    assert revisions[-1] == migrate.head()
    assert len(set(revisions)) == len(revisions)


def test_upgrade_downgrade_upgrade_matches_the_models(
    empty_database_url: str, engine: Engine
) -> None:
    assert migrate.current(empty_database_url) is None

    migrate.upgrade(empty_database_url)
    assert migrate.current(empty_database_url) == migrate.head()
    assert table_names(engine) == MODEL_TABLES | {"alembic_version"}
    assert schema_diffs(engine) == []

    migrate.downgrade(empty_database_url, "base")
    assert migrate.current(empty_database_url) is None
    assert table_names(engine) <= {"alembic_version"}

    migrate.upgrade(empty_database_url)
    assert migrate.current(empty_database_url) == migrate.head()
    assert schema_diffs(engine) == []


def test_every_revision_steps_down_and_up_again(empty_database_url: str, engine: Engine) -> None:
    """Each revision's downgrade undoes exactly its upgrade (the "stairway" test)."""
    previous: str | None = None
    for revision in revisions_in_order():
        migrate.upgrade(empty_database_url, revision)
        assert migrate.current(empty_database_url) == revision
        tables = table_names(engine)

        migrate.downgrade(empty_database_url, previous or "base")
        assert migrate.current(empty_database_url) == previous

        migrate.upgrade(empty_database_url, revision)
        assert table_names(engine) == tables
        previous = revision
    assert schema_diffs(engine) == []


def test_compare_detects_drift(database_url: str) -> None:
    """The no-diff check above can fail: a column the database lacks is reported."""
    engine = create_engine_from_url(database_url)
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["task_runs"].append_column(sa.Column("priority", sa.Integer()))
    try:
        diffs = schema_diffs(engine, drifted)
    finally:
        engine.dispose()
    assert [(d[0], d[2], d[3].name) for d in diffs] == [("add_column", "task_runs", "priority")]


def test_rows_survive_later_migrations(empty_database_url: str, engine: Engine) -> None:
    """Rows written at 0001 survive every later revision, up, down to 0001 and up again.

    On SQLite, batch mode rebuilds a table by copying it and dropping the
    original; with foreign keys enforced that drop would cascade-delete the
    rows of child tables.
    """
    migrate.upgrade(empty_database_url, "0001")
    now = "2026-01-01 00:00:00+00:00"
    statements = [
        "INSERT INTO organizations (id, slug, feature_flags, created_at) "
        f"VALUES ('org_1', 'acme', '{{}}', '{now}')",
        f"INSERT INTO projects (id, organization_id, slug, created_at) "
        f"VALUES ('proj_1', 'org_1', 'app', '{now}')",
        "INSERT INTO deployments (id, project_id, version, image, status, created_at) "
        f"VALUES ('dep_1', 'proj_1', '1', 'team/app:1', 'DEPLOYED', '{now}')",
        "INSERT INTO task_runs (id, deployment_id, task_id, status, attempt, created_at, "
        f"updated_at) VALUES ('run_1', 'dep_1', 'hello', 'EXECUTING', 1, '{now}', '{now}')",
        "INSERT INTO waitpoints (id, run_id, kind, status, created_at) "
        f"VALUES ('wp_1', 'run_1', 'DURATION', 'PENDING', '{now}')",
    ]
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))

    def assert_rows_kept(step: str) -> None:
        with engine.connect() as connection:
            for table, row_id in [
                ("organizations", "org_1"),
                ("projects", "proj_1"),
                ("deployments", "dep_1"),
                ("task_runs", "run_1"),
                ("waitpoints", "wp_1"),
            ]:
                found = connection.execute(
                    text(f"SELECT count(*) FROM {table} WHERE id = :id"), {"id": row_id}
                ).scalar_one()
                assert found == 1, f"{table} lost row {row_id} during {step}"

    migrate.upgrade(empty_database_url)
    assert_rows_kept("the upgrade to head")
    migrate.downgrade(empty_database_url, "0001")
    assert_rows_kept("the downgrade to 0001")
    migrate.upgrade(empty_database_url)
    assert_rows_kept("the second upgrade to head")


def test_current_does_not_create_a_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "vmflow.db"
    assert migrate.current(f"sqlite:///{path}") is None
    assert not path.parent.exists()


def test_unreachable_postgres_names_the_url_without_password(closed_tcp_port: int) -> None:
    url = f"postgresql+psycopg://vmflow:hunter2@127.0.0.1:{closed_tcp_port}/vmflow"

    with pytest.raises(DatabaseError) as caught:
        migrate.upgrade(url)

    message = str(caught.value)
    assert f"postgresql+psycopg://vmflow:***@127.0.0.1:{closed_tcp_port}/vmflow" in message
    assert "hunter2" not in message
    assert "cannot reach the database" in message
    assert "PostgreSQL server is running" in message


def test_unusable_sqlite_path_is_a_database_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(DatabaseError, match="cannot reach the database at sqlite:///"):
        migrate.upgrade(f"sqlite:///{blocker / 'vmflow.db'}")


@pytest.mark.parametrize("url", ["nonsense", "foo://bar/baz"])
def test_invalid_url_is_a_database_error(url: str) -> None:
    with pytest.raises(DatabaseError, match="invalid database URL"):
        migrate.upgrade(url)


def test_unknown_revision_is_a_database_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'vmflow.db'}"
    migrate.upgrade(url)
    with pytest.raises(DatabaseError, match="no_such_revision"):
        migrate.downgrade(url, "no_such_revision")


@pytest.mark.postgres
def test_concurrent_upgrades_on_postgres_take_turns(postgres_url: str) -> None:
    """Processes that start together (API, worker) may both upgrade; neither fails."""
    with postgres_schema(postgres_url) as url:
        script = "import sys; from vmflow.storage import migrate; migrate.upgrade(sys.argv[1])"
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", script, url],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(3)
        ]
        outputs = [process.communicate(timeout=120)[0] for process in processes]
        assert [process.returncode for process in processes] == [0] * 3, outputs
        assert migrate.current(url) == migrate.head()
