"""`vmflow db upgrade|downgrade|current` through typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect
from typer.testing import CliRunner

from vmflow.cli.main import app
from vmflow.storage import migrate
from vmflow.storage.db import create_engine_from_url
from vmflow.storage.models import Base

runner = CliRunner()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'vmflow.db'}"


def test_upgrade_then_current_shows_head(sqlite_url: str) -> None:
    upgraded = runner.invoke(app, ["db", "upgrade", "--url", sqlite_url])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"is at {migrate.head()} (head)" in upgraded.stdout

    engine = create_engine_from_url(sqlite_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) <= tables

    current = runner.invoke(app, ["db", "current", "--url", sqlite_url])
    assert current.exit_code == 0, current.output
    assert current.stdout.strip() == f"{migrate.head()} (head)"


def test_current_of_a_new_database_says_to_upgrade(sqlite_url: str) -> None:
    result = runner.invoke(app, ["db", "current", "--url", sqlite_url])
    assert result.exit_code == 0, result.output
    assert "no revision" in result.stdout and "vmflow db upgrade" in result.stdout


def test_downgrade_to_base_and_back(sqlite_url: str) -> None:
    assert runner.invoke(app, ["db", "upgrade", "--url", sqlite_url]).exit_code == 0

    down = runner.invoke(app, ["db", "downgrade", "base", "--url", sqlite_url])
    assert down.exit_code == 0, down.output
    assert migrate.current(sqlite_url) is None
    assert "no revision" in down.stdout

    up = runner.invoke(app, ["db", "upgrade", "0001", "--url", sqlite_url])
    assert up.exit_code == 0, up.output
    assert migrate.current(sqlite_url) == "0001"
    if migrate.head() != "0001":
        assert f"head is {migrate.head()}" in up.stdout


def test_downgrade_needs_a_revision(sqlite_url: str) -> None:
    result = runner.invoke(app, ["db", "downgrade", "--url", sqlite_url])
    assert result.exit_code == 2
    assert migrate.current(sqlite_url) is None


def test_database_url_comes_from_the_environment(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)

    result = runner.invoke(app, ["db", "upgrade"])

    assert result.exit_code == 0, result.output
    assert migrate.current(sqlite_url) == migrate.head()


def test_url_option_overrides_the_environment(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("DATABASE_URL", from_env)

    assert runner.invoke(app, ["db", "upgrade", "--url", sqlite_url]).exit_code == 0

    assert migrate.current(sqlite_url) == migrate.head()
    assert migrate.current(from_env) is None


def test_unreachable_database_is_a_clear_error(closed_tcp_port: int) -> None:
    url = f"postgresql+psycopg://vmflow:s3cret@127.0.0.1:{closed_tcp_port}/vmflow"

    for command in (["upgrade"], ["current"], ["downgrade", "base"]):
        result = runner.invoke(app, ["db", *command, "--url", url])

        assert result.exit_code == 1, result.output
        assert result.stdout == ""
        error = result.stderr
        assert error.startswith("error: cannot reach the database at ")
        assert f"postgresql+psycopg://vmflow:***@127.0.0.1:{closed_tcp_port}/vmflow" in error
        assert "s3cret" not in result.output
        assert "DATABASE_URL (or --url)" in error
        assert "Traceback" not in result.output


def test_invalid_database_url_in_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://root@localhost/vmflow")

    result = runner.invoke(app, ["db", "current"])

    assert result.exit_code == 1
    assert "DATABASE_URL='mysql://root@localhost/vmflow'" in result.stderr
    assert "--url" in result.stderr


def test_unknown_revision_is_an_error(sqlite_url: str) -> None:
    assert runner.invoke(app, ["db", "upgrade", "--url", sqlite_url]).exit_code == 0

    result = runner.invoke(app, ["db", "downgrade", "nope", "--url", sqlite_url])

    assert result.exit_code == 1
    assert "nope" in result.stderr
