"""Errors that task code can see; each message names the value and what to do instead."""

from __future__ import annotations


class VmflowTaskError(Exception):
    """Root of the errors the task SDK raises."""


class TaskDefinitionError(VmflowTaskError):
    """A task is defined wrongly: an invalid or duplicate id, or a function of the wrong shape."""


class UnknownTaskError(VmflowTaskError):
    """The run names a task id that the image does not define."""


class TaskOutputError(VmflowTaskError):
    """The task returned a value that is not JSON-serializable."""


class NoRunContextError(VmflowTaskError):
    """A run-only function (a wait, the run context) was called outside a run."""


class WaitInEventLoopError(VmflowTaskError):
    """A blocking wait was called on a running event loop, which it would block."""


class WaitpointTimeoutError(VmflowTaskError):
    """A token was not completed before its timeout."""

    def __init__(self, message: str, *, waitpoint_id: str) -> None:
        super().__init__(message)
        self.waitpoint_id = waitpoint_id
