"""The task decorator, the registry and the SDK's checks outside a run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from vmflow.runner import get_context, task, wait
from vmflow.runner.errors import (
    NoRunContextError,
    TaskDefinitionError,
    UnknownTaskError,
    WaitInEventLoopError,
)
from vmflow.runner.tasks import TaskRegistry, _make_task, registry


def test_task_decorator_registers_sync_and_async() -> None:
    @task(id="sdk-test-sync")
    def sync_task(payload: Any) -> Any:
        return payload

    @task(id="sdk-test-async")
    async def async_task(payload: Any, ctx: Any) -> Any:
        return payload

    assert sync_task(1) == 1
    assert registry.get("sdk-test-sync").is_async is False
    assert registry.get("sdk-test-sync").takes_context is False
    assert registry.get("sdk-test-async").is_async is True
    assert registry.get("sdk-test-async").takes_context is True


def test_task_bare_decorator_uses_function_name() -> None:
    @task
    def sdk_test_bare(payload: Any) -> Any:
        return payload

    assert registry.get("sdk_test_bare").function is sdk_test_bare


@pytest.mark.parametrize("task_id", ["", "-leading-dash", "has space", "slash/inside", "x" * 257])
def test_task_invalid_id_is_rejected(task_id: str) -> None:
    def function(payload: Any) -> Any:
        return payload

    with pytest.raises(TaskDefinitionError):
        _make_task(function, task_id)


def test_task_wrong_signature_is_rejected() -> None:
    def no_parameters() -> None:
        return None

    def three_parameters(a: Any, b: Any, c: Any) -> None:
        return None

    def generator(payload: Any) -> Any:
        yield payload

    with pytest.raises(TaskDefinitionError, match="takes 0 positional parameters"):
        _make_task(no_parameters, "t")
    with pytest.raises(TaskDefinitionError, match="takes 3 positional parameters"):
        _make_task(three_parameters, "t")
    with pytest.raises(TaskDefinitionError, match="is a generator"):
        _make_task(generator, "t")


def test_registry_duplicate_id_names_both_functions() -> None:
    def first(payload: Any) -> Any:
        return payload

    def second(payload: Any) -> Any:
        return payload

    local = TaskRegistry()
    local.register(_make_task(first, "same"))
    local.register(_make_task(first, "same"))

    with pytest.raises(TaskDefinitionError) as raised:
        local.register(_make_task(second, "same"))
    assert "first" in str(raised.value)
    assert "second" in str(raised.value)


def test_registry_unknown_id_lists_defined_ids() -> None:
    local = TaskRegistry()
    local.register(_make_task(lambda payload: payload, "alpha"))
    local.register(_make_task(lambda payload: payload, "beta"))

    with pytest.raises(UnknownTaskError, match="defined tasks: alpha, beta"):
        local.get("gamma")


def test_wait_outside_run_raises_clear_error() -> None:
    with pytest.raises(NoRunContextError, match="inside a task"):
        wait.for_duration(1)
    with pytest.raises(NoRunContextError):
        get_context()


async def test_wait_blocking_form_on_event_loop_is_rejected() -> None:
    with pytest.raises(WaitInEventLoopError, match=r"await wait\.for_duration_async"):
        wait.for_duration(1)
    await asyncio.sleep(0)


@pytest.mark.parametrize("duration", [-1, float("nan"), float("inf")])
def test_wait_invalid_duration_is_rejected(duration: float) -> None:
    with pytest.raises(ValueError, match="finite number of seconds"):
        wait.for_duration(duration)
