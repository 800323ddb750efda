"""Waitpoints for task code: wait for a duration, until a time, or for a token.

Each wait has a blocking form for sync tasks and an `_async` form for async
tasks: `wait.for_token(...)` and `await wait.for_token_async(...)`. The
blocking form called on a running event loop raises `WaitInEventLoopError`
instead of freezing the loop. The async form runs the blocking one in a
worker thread, so other coroutines of the task keep running while it waits.

At a wait the runner requests that the supervisor suspend the run. If the wait ends
soon, the task continues in place. Otherwise the instance is snapshotted and
deleted. A restore later brings back all of the task's memory, and the wait
returns there. One wait is active at a time per run: a second wait that
starts meanwhile (from another coroutine or thread) begins when the first ends.
"""

from __future__ import annotations

import asyncio
import math
from datetime import datetime, timedelta
from typing import Any

from vmflow.runner.errors import WaitInEventLoopError
from vmflow.runner.runtime import Token, current_runtime

__all__ = [
    "Token",
    "create_token",
    "create_token_async",
    "for_duration",
    "for_duration_async",
    "for_token",
    "for_token_async",
    "until",
    "until_async",
]


def _require_no_event_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise WaitInEventLoopError(
        f"wait.{name}() blocks and was called on a running event loop; "
        f"in an async task use `await wait.{name}_async(...)`"
    )


def _milliseconds(value: float | timedelta, what: str) -> int:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return math.ceil(seconds * 1000)


def for_duration(duration: float | timedelta) -> None:
    """Wait for `duration` (seconds, or a timedelta); the run uses no compute meanwhile."""
    _require_no_event_loop("for_duration")
    duration_ms = _milliseconds(duration, "duration")
    current_runtime().wait_for_duration(resume_at=None, duration_ms=duration_ms)


def until(when: datetime) -> None:
    """Wait until the aware datetime `when`; a time in the past returns at once."""
    _require_no_event_loop("until")
    if when.utcoffset() is None:
        raise ValueError(
            f"wait.until() needs an aware datetime, got naive {when.isoformat()}; "
            "pass for instance datetime(..., tzinfo=UTC)"
        )
    current_runtime().wait_for_duration(resume_at=when, duration_ms=None)


def create_token(*, timeout: float | timedelta | None = None, key: str | None = None) -> Token:
    """Create a token to wait for; anyone with its id may complete it with an output.

    `timeout` (seconds, or a timedelta) makes a wait for the token raise
    `WaitpointTimeoutError` when it has not been completed in time. `key`
    names the token within the run, so creating it again returns the same one.
    """
    _require_no_event_loop("create_token")
    timeout_ms = None if timeout is None else max(1, _milliseconds(timeout, "timeout"))
    return current_runtime().create_token(timeout_ms, key)


def for_token(
    token: Token | None = None, *, timeout: float | timedelta | None = None, key: str | None = None
) -> Any:
    """Wait until a token is completed and return the output it was completed with.

    Without `token`, a new one is created with `timeout` and `key` (see
    `create_token`); its id is written to the run log. Raises
    `WaitpointTimeoutError` when the timeout passes first.
    """
    _require_no_event_loop("for_token")
    runtime = current_runtime()
    if token is None:
        timeout_ms = None if timeout is None else max(1, _milliseconds(timeout, "timeout"))
        token = runtime.create_token(timeout_ms, key)
    elif timeout is not None or key is not None:
        raise ValueError("pass timeout and key to create_token(), not with an existing token")
    return runtime.wait_for_token(token)


async def for_duration_async(duration: float | timedelta) -> None:
    """Async form of `for_duration`."""
    duration_ms = _milliseconds(duration, "duration")
    runtime = current_runtime()
    await asyncio.to_thread(runtime.wait_for_duration, None, duration_ms)


async def until_async(when: datetime) -> None:
    """Async form of `until`."""
    if when.utcoffset() is None:
        raise ValueError(
            f"wait.until_async() needs an aware datetime, got naive {when.isoformat()}; "
            "pass for instance datetime(..., tzinfo=UTC)"
        )
    runtime = current_runtime()
    await asyncio.to_thread(runtime.wait_for_duration, when, None)


# The `timeout` parameters below set the token's expiry, which outlives a
# restore; asyncio.timeout() could not, so ASYNC109 does not apply.
async def create_token_async(
    *,
    timeout: float | timedelta | None = None,  # noqa: ASYNC109
    key: str | None = None,
) -> Token:
    """Async form of `create_token`."""
    timeout_ms = None if timeout is None else max(1, _milliseconds(timeout, "timeout"))
    runtime = current_runtime()
    return await asyncio.to_thread(runtime.create_token, timeout_ms, key)


async def for_token_async(
    token: Token | None = None,
    *,
    timeout: float | timedelta | None = None,  # noqa: ASYNC109
    key: str | None = None,
) -> Any:
    """Async form of `for_token`."""
    runtime = current_runtime()
    if token is None:
        token = await create_token_async(timeout=timeout, key=key)
    elif timeout is not None or key is not None:
        raise ValueError("pass timeout and key to create_token_async(), not with an existing token")
    return await asyncio.to_thread(runtime.wait_for_token, token)
