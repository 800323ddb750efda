"""Wait for a duration between two steps; the run uses no compute while it waits.

Payload (every key optional): `{"seconds": 5}`. The output shows when the
wait began and ended, and a counter kept in memory across the wait.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from vmflow.runner import RunContext, task, wait


def parse_seconds(payload: Any) -> float:
    seconds = (payload or {}).get("seconds", 5) if isinstance(payload, dict | None) else None
    if not isinstance(seconds, int | float) or seconds < 0:
        raise ValueError(f'payload must be {{"seconds": <number >= 0>}}, got {payload!r}')
    return float(seconds)


@task(id="duration-wait")
def duration_wait(payload: Any, ctx: RunContext) -> dict[str, Any]:
    seconds = parse_seconds(payload)
    steps = ["before"]
    began_at = datetime.now(UTC)
    ctx.logger.info("waiting %.1f s", seconds)

    wait.for_duration(seconds)

    steps.append("after")
    ended_at = datetime.now(UTC)
    return {
        "seconds": seconds,
        "began_at": began_at.isoformat(),
        "ended_at": ended_at.isoformat(),
        "waited_s": round((ended_at - began_at).total_seconds(), 3),
        "steps": steps,
    }


@task(id="duration-wait-async")
async def duration_wait_async(payload: Any, ctx: RunContext) -> dict[str, Any]:
    seconds = parse_seconds(payload)
    steps = ["before"]
    began_at = datetime.now(UTC)
    ctx.logger.info("waiting %.1f s", seconds)

    # Another coroutine keeps running while the wait blocks a worker thread.
    ticker = asyncio.create_task(asyncio.sleep(0, result="ticked"))
    await wait.for_duration_async(seconds)
    steps.append(await ticker)

    steps.append("after")
    ended_at = datetime.now(UTC)
    return {
        "seconds": seconds,
        "began_at": began_at.isoformat(),
        "ended_at": ended_at.isoformat(),
        "waited_s": round((ended_at - began_at).total_seconds(), 3),
        "steps": steps,
    }
