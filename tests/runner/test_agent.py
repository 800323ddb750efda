"""The runner agent as a host process against a real workload API, over a test channel.

Each waitpoint test runs for a sync and an async task with the same checks.
"""

from __future__ import annotations

import importlib
import socket
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from tests.runner.conftest import (
    SAMPLE_TASKS_DIR,
    AgentProcess,
    HostChannel,
    WorkloadServer,
    wait_until,
)
from vmflow.api.waitpoints import WaitpointStateError, complete_token
from vmflow.runner.agent import Agent
from vmflow.runner.channel import ChannelClient, InstanceIdentity
from vmflow.runner.runtime import Runtime
from vmflow.storage.db import session_scope
from vmflow.storage.models import TaskRun, TaskRunStatus, Waitpoint, WaitpointKind, WaitpointStatus

StartAgent = Callable[..., AgentProcess]

FLAVORS = ["sync", "async"]


def _runner_id(run: TaskRun, generation: int = 1) -> str:
    """Return the id the workflow gives the run's `generation`-th runner."""
    return f"{run.id}-r{generation}"


def _wait_for_suspend(server: WorkloadServer, run_id: str, agent: AgentProcess) -> Waitpoint:
    """Wait until the runner has asked to suspend; return its waitpoint."""

    def suspended() -> Waitpoint | None:
        if agent.process.poll() is not None:
            pytest.fail(f"agent exited early; stderr:\n{agent.stderr()}", pytrace=False)
        if not server.events.for_run(run_id, "suspend_requested"):
            return None
        return server.waitpoints(run_id)[-1]

    return wait_until(suspended, timeout_s=30, message=f"run {run_id} never asked to suspend")


def _complete(server: WorkloadServer, waitpoint_id: str, output: object) -> None:
    with session_scope(server.sessions) as session:
        complete_token(session, waitpoint_id, output)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_token_wait_continues_in_place(
    flavor: str, workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run(f"token-{flavor}", {"timeout_s": 600})
    runner_id = _runner_id(run)
    host_channel.set_run(workload_server, run, runner_id)
    agent = start_agent(host_channel)

    waitpoint = _wait_for_suspend(workload_server, run.id, agent)
    assert waitpoint.kind is WaitpointKind.TOKEN
    assert workload_server.get_run(run.id).status is TaskRunStatus.SUSPENDING
    _complete(workload_server, waitpoint.id, {"approver": "ada", "note": "ship it"})

    assert agent.wait_exit() == 0, agent.stderr()
    finished = workload_server.get_run(run.id)
    assert finished.status is TaskRunStatus.COMPLETED, finished.error
    assert finished.output["token_output"] == {"approver": "ada", "note": "ship it"}
    assert finished.output["memory"]["runner_id"] == runner_id
    assert finished.output["finished_as"] == runner_id
    names = [event.name for event in workload_server.events.for_run(run.id)]
    assert names == ["runner_started", "suspend_requested", "runner_resumed", "runner_finished"]
    marker = finished.output["memory"]["marker"]
    assert f"vmflow.task.token-{flavor}: memory marker {marker}" in workload_server.log_messages(
        run.id
    )


@pytest.mark.parametrize("flavor", FLAVORS)
def test_token_wait_adopts_restored_identity(
    flavor: str, workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run(f"token-{flavor}", {"timeout_s": 600})
    first_runner = _runner_id(run)
    host_channel.set_run(workload_server, run, first_runner)
    agent = start_agent(host_channel)
    waitpoint = _wait_for_suspend(workload_server, run.id, agent)

    # What a snapshot and restore look like from inside: the channel stops
    # accepting, then accepts again with a new runner id and a higher generation.
    host_channel.pause()
    second_runner = _runner_id(run, 2)
    host_channel.restore(second_runner, snapshot_id=f"snap-{uuid.uuid4().hex[:8]}")
    _complete(workload_server, waitpoint.id, "approved")
    host_channel.resume()

    assert agent.wait_exit() == 0, agent.stderr()
    finished = workload_server.get_run(run.id)
    assert finished.status is TaskRunStatus.COMPLETED, finished.error
    assert finished.runner_id == second_runner
    assert finished.output["token_output"] == "approved"
    assert finished.output["memory"]["runner_id"] == first_runner
    assert finished.output["finished_as"] == second_runner
    resumed = workload_server.events.for_run(run.id, "runner_resumed")
    assert [event.runner_id for event in resumed] == [second_runner]
    assert resumed[0].details == {"waitpoint_id": waitpoint.id}
    finished_events = workload_server.events.for_run(run.id, "runner_finished")
    assert [event.runner_id for event in finished_events] == [second_runner]
    assert any(
        "woke inside a restored snapshot" in line for line in workload_server.log_messages(run.id)
    )


def test_stale_agent_stops_without_changes(
    workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run("token-sync", {"timeout_s": 600})
    # The workflow already moved on to the run's second runner, as after a
    # restore, while this instance still reports the first one.
    with session_scope(workload_server.sessions) as session:
        stored = session.get(TaskRun, run.id)
        assert stored is not None
        stored.runner_id = _runner_id(run, 2)
    host_channel.set_run(workload_server, run, _runner_id(run, 1))
    agent = start_agent(host_channel)

    assert agent.wait_exit() == 4, agent.stderr()
    assert f"runner {_runner_id(run, 1)} of run {run.id} is stale" in agent.stderr()
    unchanged = workload_server.get_run(run.id)
    assert unchanged.runner_id == _runner_id(run, 2)
    assert unchanged.status is TaskRunStatus.PENDING
    assert workload_server.events.for_run(run.id) == []
    assert workload_server.log_messages(run.id) == []


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_agent_gives_up_on_dead_proxy_target(
    workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    deadline_s = 4.0
    run = workload_server.create_run("token-sync", {"timeout_s": 600})
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = start_agent(host_channel, retry_deadline_s=deadline_s)
    _wait_for_suspend(workload_server, run.id, agent)

    # As after a restore whose proxy points at a dead address: the channel
    # still serves the identity, but every workload request gets a 502.
    host_channel.server.set_workload(
        f"http://127.0.0.1:{_closed_port()}", host_channel.server.workload_token
    )
    dead_from = time.monotonic()
    exit_status = agent.wait_exit(timeout_s=60)
    dead_for = time.monotonic() - dead_from

    assert exit_status == 5, agent.stderr()
    assert f"gives up on run {run.id}" in agent.stderr()
    assert "HTTP 502" in agent.stderr()
    # One deadline for the waitpoint poll, the log shipping and the failure
    # report together, not one deadline each.
    assert dead_for < 2 * deadline_s, agent.stderr()
    assert workload_server.get_run(run.id).status is TaskRunStatus.SUSPENDING


@pytest.mark.parametrize("flavor", FLAVORS)
def test_duration_wait_completes(
    flavor: str, workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run(f"duration-{flavor}", {"seconds": 0.3})
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = start_agent(host_channel)

    assert agent.wait_exit() == 0, agent.stderr()
    finished = workload_server.get_run(run.id)
    assert finished.status is TaskRunStatus.COMPLETED, finished.error
    assert finished.output["waits"] == 2
    waitpoints = workload_server.waitpoints(run.id)
    assert [waitpoint.kind for waitpoint in waitpoints] == [WaitpointKind.DURATION] * 2
    assert all(waitpoint.status is WaitpointStatus.COMPLETED for waitpoint in waitpoints)
    assert len({waitpoint.idempotency_key for waitpoint in waitpoints}) == 2


@pytest.mark.parametrize("flavor", FLAVORS)
def test_token_timeout_fails_run(
    flavor: str, workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run(f"token-{flavor}", {"timeout_s": 0.2})
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = start_agent(host_channel)

    assert agent.wait_exit() == 0, agent.stderr()
    failed = workload_server.get_run(run.id)
    assert failed.status is TaskRunStatus.FAILED
    assert failed.error["name"] == "vmflow.runner.errors.WaitpointTimeoutError"
    assert "was not completed before its timeout" in failed.error["message"]
    assert workload_server.waitpoints(run.id)[0].status is WaitpointStatus.TIMED_OUT


@pytest.mark.parametrize("flavor", FLAVORS)
def test_task_exception_fails_run(
    flavor: str, workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run(f"raises-{flavor}", {"rows": 3})
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = start_agent(host_channel)

    assert agent.wait_exit() == 0, agent.stderr()
    failed = workload_server.get_run(run.id)
    assert failed.status is TaskRunStatus.FAILED
    assert failed.error["name"] == "ValueError"
    assert failed.error["message"] == "bad input {'rows': 3}"
    assert 'raise ValueError(f"bad input {payload!r}")' in failed.error["traceback"]
    assert f"vmflow.task.raises-{flavor}: about to fail" in workload_server.log_messages(run.id)
    assert [event.name for event in workload_server.events.for_run(run.id)] == [
        "runner_started",
        "runner_finished",
    ]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_output_not_json_fails_run(
    flavor: str, workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run(f"bad-output-{flavor}")
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = start_agent(host_channel)

    assert agent.wait_exit() == 0, agent.stderr()
    failed = workload_server.get_run(run.id)
    assert failed.status is TaskRunStatus.FAILED
    assert failed.error["name"] == "vmflow.runner.errors.TaskOutputError"
    assert "not JSON-serializable" in failed.error["message"]
    assert f"bad-output-{flavor}" in failed.error["message"]


def test_surrogate_output_fails_run(
    workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run("surrogate-output")
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = start_agent(host_channel)

    assert agent.wait_exit() == 0, agent.stderr()
    failed = workload_server.get_run(run.id)
    assert failed.status is TaskRunStatus.FAILED
    assert failed.error["name"] == "vmflow.runner.errors.TaskOutputError"
    assert "surrogate-output" in failed.error["message"]
    assert any(
        "lone surrogate \\ud800 in a log line" in line
        for line in workload_server.log_messages(run.id)
    )


def test_unknown_task_fails_run_listing_ids(
    workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run("no-such-task")
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = start_agent(host_channel)

    assert agent.wait_exit() == 0, agent.stderr()
    failed = workload_server.get_run(run.id)
    assert failed.status is TaskRunStatus.FAILED
    assert failed.error["name"] == "vmflow.runner.errors.UnknownTaskError"
    assert "'no-such-task' is not defined in this image" in failed.error["message"]
    assert (
        "echo, raises-async, raises-sync, surrogate-output, token-async, token-sync"
        in failed.error["message"]
    )


def test_blocking_wait_in_async_task_fails_run(
    workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run("blocking-wait-in-async")
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = start_agent(host_channel)

    assert agent.wait_exit() == 0, agent.stderr()
    failed = workload_server.get_run(run.id)
    assert failed.error["name"] == "vmflow.runner.errors.WaitInEventLoopError"
    assert "await wait.for_token_async(...)" in failed.error["message"]
    assert workload_server.waitpoints(run.id) == []


def test_import_error_fails_run(
    workload_server: WorkloadServer,
    host_channel: HostChannel,
    start_agent: StartAgent,
    tmp_path: pytest.TempPathFactory,
) -> None:
    run = workload_server.create_run("echo", {"x": 1})
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = start_agent(host_channel, modules="sample_tasks,missing_module_for_test")

    assert agent.wait_exit() == 0, agent.stderr()
    failed = workload_server.get_run(run.id)
    assert failed.status is TaskRunStatus.FAILED
    assert failed.error["name"] == "ModuleNotFoundError"
    assert "importing task module 'missing_module_for_test' failed" in failed.error["message"]


def test_agent_waits_for_run_after_ready(
    workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    agent = start_agent(host_channel)
    wait_until(lambda: host_channel.ready_count == 1, timeout_s=30, message="agent never ready")
    assert agent.process.poll() is None

    # As a template restored into a real instance: the identity now names a run.
    run = workload_server.create_run("echo", {"hello": "world"})
    host_channel.set_run(workload_server, run, _runner_id(run))

    assert agent.wait_exit() == 0, agent.stderr()
    finished = workload_server.get_run(run.id)
    assert finished.status is TaskRunStatus.COMPLETED
    assert finished.output == {"hello": "world"}


def test_token_completed_twice_keeps_first_output(
    workload_server: WorkloadServer, host_channel: HostChannel, start_agent: StartAgent
) -> None:
    run = workload_server.create_run("token-sync", {"timeout_s": 600})
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = start_agent(host_channel)
    waitpoint = _wait_for_suspend(workload_server, run.id, agent)

    _complete(workload_server, waitpoint.id, "first")
    with pytest.raises(WaitpointStateError, match="already COMPLETED") as raised:
        _complete(workload_server, waitpoint.id, "second")
    assert waitpoint.id in str(raised.value)

    assert agent.wait_exit() == 0, agent.stderr()
    assert workload_server.get_run(run.id).output["token_output"] == "first"
    assert workload_server.waitpoints(run.id)[0].output == "first"


def test_runtime_stale_request_adopts_restored_identity(
    workload_server: WorkloadServer, host_channel: HostChannel
) -> None:
    run = workload_server.create_run("echo")
    before, after = f"{run.id}-r1", f"{run.id}-r2"
    host_channel.set_run(workload_server, run, before)
    runtime = Runtime(
        ChannelClient(str(host_channel.socket_path), retry_deadline_s=30),
        InstanceIdentity.from_json(host_channel.identity),
        runner_id=before,
        run_id=run.id,
    )
    runtime.call("POST", "/start", {})
    runtime.wait_for_duration(resume_at=None, duration_ms=0)

    # A snapshot taken after the wait ended: the runner sends its next
    # request with the old id, is rejected as stale, and adopts the new one.
    host_channel.restore(after, snapshot_id="snap-late")
    status = runtime.heartbeat()

    assert status == "EXECUTING"
    assert runtime.runner_id == after
    assert workload_server.get_run(run.id).runner_id == after
    resumed = workload_server.events.for_run(run.id, "runner_resumed")
    assert [event.runner_id for event in resumed] == [after]


def test_agent_heartbeats_and_stops_when_canceled(
    workload_server: WorkloadServer, host_channel: HostChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(SAMPLE_TASKS_DIR))
    sample_tasks = importlib.import_module("sample_tasks")
    run = workload_server.create_run("blocks-until-released")
    host_channel.set_run(workload_server, run, _runner_id(run))
    agent = Agent(ChannelClient(str(host_channel.socket_path), retry_deadline_s=30), None)
    agent.heartbeat_interval_s = 0.1
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(agent.run()), daemon=True)
    thread.start()

    try:
        started = wait_until(
            lambda: workload_server.get_run(run.id).last_heartbeat_at,
            timeout_s=30,
            message="run never started",
        )
        wait_until(
            lambda: workload_server.get_run(run.id).last_heartbeat_at != started,
            timeout_s=30,
            message="no heartbeat after the start",
        )
        with session_scope(workload_server.sessions) as session:
            stored = session.get(TaskRun, run.id)
            assert stored is not None
            stored.status = TaskRunStatus.CANCELED
        thread.join(timeout=30)
    finally:
        sample_tasks.release.set()

    assert exit_codes == [3]
    assert workload_server.get_run(run.id).status is TaskRunStatus.CANCELED
    assert workload_server.events.for_run(run.id, "runner_finished") == []
