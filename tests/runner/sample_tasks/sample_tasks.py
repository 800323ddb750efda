"""Tasks the runner tests execute; each sync task has an async twin with the same behavior."""

from __future__ import annotations

import os
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from vmflow.runner import RunContext, get_context, task, wait


def _memory() -> dict[str, Any]:
    # Drawn before the wait and only kept in memory: a restored process
    # returns the same values, a re-executed task would draw new ones.
    return {"marker": uuid.uuid4().hex, "pid": os.getpid(), "runner_id": get_context().runner_id}


@task(id="token-sync")
def token_sync(payload: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    memory = _memory()
    ctx.logger.info("memory marker %s", memory["marker"])
    output = wait.for_token(timeout=payload.get("timeout_s"), key="approval")
    return {"memory": memory, "token_output": output, "finished_as": ctx.runner_id}


@task(id="token-async")
async def token_async(payload: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    memory = _memory()
    ctx.logger.info("memory marker %s", memory["marker"])
    output = await wait.for_token_async(timeout=payload.get("timeout_s"), key="approval")
    return {"memory": memory, "token_output": output, "finished_as": ctx.runner_id}


@task(id="duration-sync")
def duration_sync(payload: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    memory = _memory()
    wait.for_duration(payload["seconds"])
    wait.until(datetime.now(UTC) + timedelta(seconds=payload["seconds"]))
    return {"memory": memory, "waits": 2}


@task(id="duration-async")
async def duration_async(payload: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    memory = _memory()
    await wait.for_duration_async(payload["seconds"])
    await wait.until_async(datetime.now(UTC) + timedelta(seconds=payload["seconds"]))
    return {"memory": memory, "waits": 2}


@task(id="raises-sync")
def raises_sync(payload: Any, ctx: RunContext) -> None:
    ctx.logger.info("about to fail")
    raise ValueError(f"bad input {payload!r}")


@task(id="raises-async")
async def raises_async(payload: Any, ctx: RunContext) -> None:
    ctx.logger.info("about to fail")
    raise ValueError(f"bad input {payload!r}")


@task(id="bad-output-sync")
def bad_output_sync(payload: Any) -> Any:
    return {"values": {1, 2}}


@task(id="bad-output-async")
async def bad_output_async(payload: Any) -> Any:
    return {"values": {1, 2}}


@task(id="surrogate-output")
def surrogate_output(payload: Any, ctx: RunContext) -> Any:
    ctx.logger.info("lone surrogate \ud800 in a log line")
    return {"text": "\udc00"}


@task(id="blocking-wait-in-async")
async def blocking_wait_in_async(payload: Any) -> Any:
    return wait.for_token()


@task
def echo(payload: Any) -> Any:
    return payload


# Set by a test to let `blocks-until-released` return.
release = threading.Event()


@task(id="blocks-until-released")
def blocks_until_released(payload: Any) -> str:
    release.wait(timeout=60)
    return "released"
