"""The vmflow runner: the SDK task code imports, and the agent that runs it in an instance.

Task authors write::

    from vmflow.runner import task, wait, get_context

    @task(id="greet")
    def greet(payload):
        note = wait.for_token(timeout=3600)
        get_context().logger.info("approved: %s", note)
        return {"hello": payload["name"], "note": note}
"""

from vmflow.runner import wait
from vmflow.runner.context import RunContext, get_context
from vmflow.runner.errors import (
    NoRunContextError,
    TaskDefinitionError,
    TaskOutputError,
    UnknownTaskError,
    VmflowTaskError,
    WaitInEventLoopError,
    WaitpointTimeoutError,
)
from vmflow.runner.runtime import Token
from vmflow.runner.tasks import Task, task

__all__ = [
    "NoRunContextError",
    "RunContext",
    "Task",
    "TaskDefinitionError",
    "TaskOutputError",
    "Token",
    "UnknownTaskError",
    "VmflowTaskError",
    "WaitInEventLoopError",
    "WaitpointTimeoutError",
    "get_context",
    "task",
    "wait",
]
