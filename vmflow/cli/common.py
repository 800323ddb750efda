"""Helpers the CLI commands share: JSON options, error exits and bounded polling."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import typer
from rich.console import Console

from vmflow.cli.client import ApiClientError
from vmflow.cli.local import LocalStateError

console = Console(highlight=False)
error_console = Console(stderr=True, highlight=False)

T = TypeVar("T")


def parse_json_option(value: str | None, option: str) -> Any:
    """Parse a JSON option value; exit with status 2 naming the option when it is invalid."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        error_console.print(f"[red]error:[/] {option} is not valid JSON: {error}")
        raise typer.Exit(2) from None


@contextmanager
def exit_on_api_error() -> Iterator[None]:
    """Turn API and local-state errors into a red message on stderr and exit status 1."""
    try:
        yield
    except (ApiClientError, LocalStateError) as error:
        error_console.print(f"[red]error:[/] {error}")
        raise typer.Exit(1) from None


def poll_until(
    read: Callable[[], T],
    done: Callable[[T], bool],
    *,
    timeout_s: float,
    interval_s: float = 0.25,
    on_value: Callable[[T], None] | None = None,
    what: str = "the condition",
) -> T:
    """Call `read` every `interval_s` until `done` holds; raise TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if on_value is not None:
            on_value(value)
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(interval_s)


def clock(timestamp: str | None) -> str:
    """Format an ISO timestamp from the API as local HH:MM:SS.mmm."""
    if not timestamp:
        return "-"
    return datetime.fromisoformat(timestamp).astimezone().strftime("%H:%M:%S.%f")[:-3]
