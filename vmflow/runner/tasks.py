"""The `task` decorator and the registry of the tasks an image defines."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from vmflow.runner.errors import TaskDefinitionError, UnknownTaskError

# The same rule as the supervisor API's task ids.
TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.:-]*$")
MAX_TASK_ID_CHARS = 256

FunctionT = TypeVar("FunctionT", bound=Callable[..., Any])


@dataclass(frozen=True)
class Task:
    """A task function with its id.

    `takes_context` is true when the function has a second parameter, which
    then receives the `RunContext`.
    """

    id: str
    function: Callable[..., Any]
    is_async: bool
    takes_context: bool

    @property
    def location(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"


class TaskRegistry:
    """Task ids of one image, each unique."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def register(self, task: Task) -> None:
        existing = self._tasks.get(task.id)
        # Importing a module twice registers the same function again; that is no conflict.
        if existing is not None and existing.location != task.location:
            raise TaskDefinitionError(
                f"task id {task.id!r} is defined twice, by {existing.location} and "
                f"{task.location}; give each task its own id"
            )
        self._tasks[task.id] = task

    def get(self, task_id: str) -> Task:
        task = self._tasks.get(task_id)
        if task is None:
            defined = ", ".join(sorted(self._tasks)) or "none"
            raise UnknownTaskError(
                f"task {task_id!r} is not defined in this image; defined tasks: {defined}"
            )
        return task

    def ids(self) -> list[str]:
        return sorted(self._tasks)

    def clear(self) -> None:
        self._tasks.clear()


registry = TaskRegistry()


def _make_task(function: Callable[..., Any], task_id: str) -> Task:
    if not isinstance(task_id, str) or not TASK_ID_PATTERN.match(task_id):
        raise TaskDefinitionError(
            f"invalid task id {task_id!r} on {function.__qualname__}: use letters, digits, "
            "'_', '.', ':' or '-', starting with a letter or digit"
        )
    if len(task_id) > MAX_TASK_ID_CHARS:
        raise TaskDefinitionError(
            f"task id {task_id[:40]!r}… is {len(task_id)} characters; "
            f"the maximum is {MAX_TASK_ID_CHARS}"
        )
    if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
        raise TaskDefinitionError(
            f"task {task_id!r} ({function.__qualname__}) is a generator; "
            "a task returns its output instead of yielding it"
        )

    positional = [
        parameter
        for parameter in inspect.signature(function).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    if not 1 <= len(positional) <= 2:
        raise TaskDefinitionError(
            f"task {task_id!r} ({function.__qualname__}) takes {len(positional)} positional "
            "parameters; a task takes (payload) or (payload, ctx)"
        )
    return Task(
        id=task_id,
        function=function,
        is_async=inspect.iscoroutinefunction(function),
        takes_context=len(positional) == 2,
    )


@overload
def task(function: FunctionT, /) -> FunctionT: ...


@overload
def task(*, id: str | None = None) -> Callable[[FunctionT], FunctionT]: ...


def task(
    function: FunctionT | None = None, /, *, id: str | None = None
) -> FunctionT | Callable[[FunctionT], FunctionT]:
    """Register a sync or async function as a task of this image.

    `@task(id="approval-report")` sets the id; a bare `@task` uses the
    function's name. The function takes the run's payload, and optionally the
    `RunContext` as a second parameter; its return value, which must be
    JSON-serializable, is the run's output. The function itself is returned
    unchanged, so it can still be called directly in tests.
    """

    def register(target: FunctionT) -> FunctionT:
        registry.register(_make_task(target, id if id is not None else target.__name__))
        return target

    if function is not None:
        return register(function)
    return register
