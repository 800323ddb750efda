"""Schema migrations as a Python API: `upgrade`, `downgrade`, `current`, `head`.

The Alembic `Config` is built in code, pointing at the migrations shipped in
this package, so no alembic.ini is needed at run time. Every function takes a
SQLAlchemy URL and raises `DatabaseError` with the URL (password hidden) and
the fix when the database cannot be reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import pool
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from vmflow.storage.db import DatabaseError, create_engine_from_url, redact_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

T = TypeVar("T")


def alembic_config(url: str) -> Config:
    """Return an Alembic `Config` for `url` and the packaged migrations."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not a main option: configparser would choke on `%`.
    config.attributes["url"] = url
    return config


def head() -> str:
    """Return the newest revision of the packaged migrations."""
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    if len(heads) != 1:
        raise DatabaseError(f"migrations have {len(heads)} heads {heads}; merge them")
    return heads[0]


def _unreachable_message(url: str, error: BaseException) -> str:
    parsed = make_url(url)
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()
    detail = reason[0] if reason else type(error).__name__
    if parsed.get_backend_name() == "sqlite":
        fix = "check that the file's directory exists and is writable, or pass another --url"
    else:
        fix = (
            "check that the PostgreSQL server is running and accepts connections, and that "
            "DATABASE_URL (or --url) names the right host, port, user and database"
        )
    return f"cannot reach the database at {redact_url(url)}: {detail}; {fix}"


@contextmanager
def _translated_errors(url: str) -> Iterator[None]:
    try:
        yield
    except ArgumentError as error:
        raise DatabaseError(
            f"invalid database URL {redact_url(url)}: {error}; expected sqlite:///PATH "
            "or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from error
    except OperationalError as error:
        raise DatabaseError(_unreachable_message(url, error)) from error
    except OSError as error:
        raise DatabaseError(_unreachable_message(url, error)) from error
    except CommandError as error:
        raise DatabaseError(f"migration of {redact_url(url)} failed: {error}") from error


def _run(url: str, action: Callable[[Config], T]) -> T:
    make_url_or_raise(url)
    with _translated_errors(url):
        return action(alembic_config(url))


def make_url_or_raise(url: str) -> None:
    """Raise `DatabaseError` unless `url` parses as a SQLAlchemy URL."""
    with _translated_errors(url):
        make_url(url)


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (the newest by default)."""
    _run(url, lambda config: command.upgrade(config, revision))


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` (`base` removes every table)."""
    _run(url, lambda config: command.downgrade(config, revision))


def current(url: str) -> str | None:
    """Return the revision the database at `url` is at, or None if it was never migrated."""

    def read(_config: Config) -> str | None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            if not Path(parsed.database).expanduser().exists():
                return None  # reading must not create the file
        engine = create_engine_from_url(url, poolclass=pool.NullPool)
        try:
            with engine.connect() as connection:
                return MigrationContext.configure(connection).get_current_revision()
        finally:
            engine.dispose()

    return _run(url, read)
