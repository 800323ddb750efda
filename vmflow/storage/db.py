"""Engines and sessions for SQLite files and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

# Seconds libpq waits for a PostgreSQL server before giving up, unless the URL
# sets connect_timeout itself.
POSTGRES_CONNECT_TIMEOUT_S = 10


class DatabaseError(RuntimeError):
    """The database URL is invalid or the database cannot be reached or migrated."""


def redact_url(url: str) -> str:
    """Return `url` with its password replaced by `***`, safe to print or log."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def _enable_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # SQLite enforces foreign keys only when each connection enables them. WAL lets the
    # API read while the worker writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def create_engine_from_url(url: str, **kwargs: Any) -> Engine:
    """Create an engine for `url`, creating a SQLite file's directory when missing."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        # psycopg 3 is the driver installed; SQLAlchemy's default would be psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
        url = parsed.render_as_string(hide_password=False)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _enable_sqlite_pragmas)
        return engine
    if "connect_timeout" not in parsed.query:
        connect_args = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        connect_args.update(kwargs.pop("connect_args", {}))
        kwargs["connect_args"] = connect_args
    return create_engine(url, pool_pre_ping=True, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Yield a session that commits on success and rolls back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
