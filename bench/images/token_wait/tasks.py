"""The resume benchmark's task: wait for a token, then report when it ran again.

The output's `resumed_at_ns` is the host's wall clock (Unix epoch
nanoseconds) right after the wait returned. A sandbox shares the host's
clock, so the benchmark subtracts the time it completed the token.
"""

from __future__ import annotations

import time
from typing import Any

from vmflow.runner import RunContext, task, wait


@task(id="bench-token-wait")
def token_wait(payload: Any, ctx: RunContext) -> dict[str, Any]:
    started_as = ctx.runner_id
    output = wait.for_token(key="resume")
    return {
        "resumed_at_ns": time.time_ns(),
        "started_as_runner": started_as,
        "finished_as_runner": ctx.runner_id,
        "token_output": output,
    }
