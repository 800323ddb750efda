"""`vmflow db`: migrate the database schema (upgrade, downgrade, current)."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer

from vmflow.config import ConfigError, get_settings
from vmflow.storage import migrate
from vmflow.storage.db import DatabaseError, redact_url

app = typer.Typer(
    name="db",
    help="Migrate the database schema (DATABASE_URL, or --url).",
    no_args_is_help=True,
)

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="SQLAlchemy URL of the database; defaults to DATABASE_URL.",
        show_default=False,
    ),
]


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def _resolve_url(url: str | None) -> str:
    if url:
        return url
    try:
        return get_settings().DATABASE_URL
    except ConfigError as error:
        _fail(f"{error}\n(or pass the database with --url)")


def _describe(revision: str | None) -> str:
    if revision is None:
        return "no revision (empty schema; run `vmflow db upgrade`)"
    newest = migrate.head()
    if revision == newest:
        return f"{revision} (head)"
    return f"{revision} (head is {newest}; run `vmflow db upgrade`)"


@app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    url: UrlOption = None,
) -> None:
    """Migrate the database up to REVISION (the newest by default)."""
    target = _resolve_url(url)
    try:
        migrate.upgrade(target, revision)
        now = migrate.current(target)
    except DatabaseError as error:
        _fail(str(error))
    typer.echo(f"{redact_url(target)} is at {_describe(now)}")


@app.command()
def downgrade(
    revision: Annotated[
        str, typer.Argument(help="Target revision; `base` drops every vmflow table.")
    ],
    url: UrlOption = None,
) -> None:
    """Migrate the database down to REVISION."""
    target = _resolve_url(url)
    try:
        migrate.downgrade(target, revision)
        now = migrate.current(target)
    except DatabaseError as error:
        _fail(str(error))
    typer.echo(f"{redact_url(target)} is at {_describe(now)}")


@app.command()
def current(url: UrlOption = None) -> None:
    """Print the revision the database is at."""
    target = _resolve_url(url)
    try:
        now = migrate.current(target)
    except DatabaseError as error:
        _fail(str(error))
    typer.echo(_describe(now))
