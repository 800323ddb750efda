"""The runner agent an instance starts: `python -m vmflow.runner.agent`.

It imports the image's task modules (VMFLOW_TASK_MODULES, comma-separated),
reports ready on the channel (VMFLOW_CHANNEL), and polls the instance's
identity until it names a run. A process booted for a template waits there
until a restore turns it into a real instance. It then starts the run and
executes the task in a thread of its own, an async task on an event loop in
that thread. The main thread sends heartbeats and ships logs meanwhile, and
at the end reports the output, or the error with its traceback.

Identity comes from the channel only, never from os.environ, because the
environment of a restored process is the one it was snapshotted with.

Exit status: 0 once the run's result is recorded, 1 when it could not be
reported, 2 for a missing or invalid environment, and 3 when the run was
finished from outside (canceled) while the task still ran. Status 4 means
the workload API rejected this runner as stale because another runner is
the run's current one, so the runner stopped and changed nothing. Status 5
means the workload API stayed unreachable through the channel for the
channel client's retry deadline (VMFLOW_CHANNEL_RETRY_DEADLINE_S, 300 s by
default), so the runner gave up on the run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmflow.runner.channel import (
    ChannelClient,
    ChannelError,
    ChannelUnavailableError,
    InstanceIdentity,
    WorkloadAPIError,
)
from vmflow.runner.context import RunContext, set_context
from vmflow.runner.errors import TaskOutputError, UnknownTaskError
from vmflow.runner.runtime import (
    Execution,
    RunLogHandler,
    Runtime,
    set_current_runtime,
    to_utf8_text,
)
from vmflow.runner.tasks import Task, registry

logger = logging.getLogger("vmflow.runner.agent")

IDENTITY_POLL_INTERVAL_S = 0.2
HEARTBEAT_INTERVAL_S = 10.0
LOG_FLUSH_INTERVAL_S = 0.5

_FINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELED", "TIMED_OUT"})

EXIT_CANCELED = 3
EXIT_STALE_RUNNER = 4
EXIT_UNREACHABLE = 5

DEFAULT_RETRY_DEADLINE_S = 300.0


def is_stale_runner(error: BaseException | None) -> bool:
    """Return whether `error` is the workload API's 409 `stale_runner`."""
    return isinstance(error, WorkloadAPIError) and error.code == "stale_runner"


@dataclass
class ImportFailure:
    module: str
    error: BaseException
    traceback: str


@dataclass
class TaskOutcome:
    output: Any = None
    error: BaseException | None = None
    traceback: str | None = None


def load_task_modules(modules: Sequence[str]) -> ImportFailure | None:
    """Import each task module, registering its tasks; return the first failure, if any."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            logger.exception("importing task module %r failed", module)
            return ImportFailure(module, error, traceback.format_exc())
    return None


def parse_module_list(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def wait_for_run(channel: ChannelClient) -> InstanceIdentity:
    """Poll the instance's identity until its env names a run."""
    announced = False
    while True:
        identity = channel.instance()
        if identity.run_id:
            return identity
        if not announced:
            logger.info("instance %s is ready and waits for a run", identity.id)
            announced = True
        time.sleep(IDENTITY_POLL_INTERVAL_S)


def error_details(error: BaseException, formatted_traceback: str | None) -> dict[str, Any]:
    error_type = type(error)
    name = error_type.__qualname__
    if error_type.__module__ not in ("builtins", "__main__"):
        name = f"{error_type.__module__}.{name}"
    return {
        "name": to_utf8_text(name),
        "message": to_utf8_text(str(error)),
        "traceback": None if formatted_traceback is None else to_utf8_text(formatted_traceback),
    }


def execute_task(task: Task, payload: Any, context: RunContext, outcome: TaskOutcome) -> None:
    """Run the task function to completion in the current thread and store its outcome."""
    args = (payload, context) if task.takes_context else (payload,)
    try:
        if task.is_async:
            outcome.output = asyncio.run(task.function(*args))
        else:
            outcome.output = task.function(*args)
    # The task's thread ends here; every exception, SystemExit included, is
    # the run's error and is reported by the main thread.
    except BaseException as error:
        outcome.error = error
        outcome.traceback = traceback.format_exc()


def check_output(task_id: str, output: Any) -> None:
    try:
        # Encoding to UTF-8 rejects lone surrogates, as the workload API does.
        json.dumps(output, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise TaskOutputError(
            f"task {task_id!r} returned a {type(output).__name__} that is not "
            f"JSON-serializable ({error}); return dicts, lists, strings, numbers, "
            "booleans or None"
        ) from error


class Agent:
    """One runner process: from ready to the run's reported result."""

    def __init__(self, channel: ChannelClient, import_failure: ImportFailure | None) -> None:
        self.channel = channel
        self.import_failure = import_failure
        self.heartbeat_interval_s = HEARTBEAT_INTERVAL_S

    def run(self) -> int:
        self.channel.ready()
        identity = wait_for_run(self.channel)
        run_id = identity.run_id
        assert run_id is not None
        runner_id = identity.runner_id or f"runner-{identity.id}"

        runtime = Runtime(self.channel, identity, runner_id=runner_id, run_id=run_id)
        set_current_runtime(runtime)
        handler = RunLogHandler(runtime)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            return self._execute(runtime)
        except WorkloadAPIError as error:
            if not is_stale_runner(error):
                raise
            # Runtime.call already checked the identity and found no newer one,
            # so another runner owns the run. Reporting anything would fail.
            logger.error(
                "runner %s of run %s is stale and stops without reporting: %s",
                runtime.runner_id,
                runtime.run_id,
                error.message,
            )
            return EXIT_STALE_RUNNER
        except ChannelUnavailableError as error:
            logger.error(
                "runner %s gives up on run %s: the workload API was unreachable through "
                "the channel for %.0f s: %s",
                runtime.runner_id,
                runtime.run_id,
                self.channel.retry_deadline_s,
                error,
            )
            return EXIT_UNREACHABLE
        finally:
            logging.getLogger().removeHandler(handler)
            set_context(None)
            set_current_runtime(None)

    def _execute(self, runtime: Runtime) -> int:
        execution = Execution.from_json(runtime.call("POST", "/start", {}))
        runtime.execution = execution
        logger.info(
            "runner %s starts run %s (task %s, attempt %d) on instance %s",
            runtime.runner_id,
            execution.run_id,
            execution.task_id,
            execution.attempt,
            runtime.instance_id,
        )

        if self.import_failure is not None:
            failure = self.import_failure
            details = error_details(failure.error, failure.traceback)
            details["message"] = (
                f"importing task module {failure.module!r} failed: {details['message']}"
            )
            return self._report_failure(runtime, details)
        try:
            task = registry.get(execution.task_id)
        except UnknownTaskError as error:
            return self._report_failure(runtime, error_details(error, None))

        context = RunContext(
            run_id=execution.run_id,
            task_id=task.id,
            attempt=execution.attempt,
            deployment_id=execution.deployment_id,
            logger=logging.getLogger(f"vmflow.task.{task.id}"),
        )
        set_context(context)
        outcome = TaskOutcome()
        thread = threading.Thread(
            target=execute_task,
            args=(task, execution.payload, context, outcome),
            name=f"task-{task.id}",
            daemon=True,
        )
        thread.start()
        canceled = self._supervise(runtime, thread)
        if canceled:
            return EXIT_CANCELED

        if is_stale_runner(outcome.error):
            assert outcome.error is not None
            raise outcome.error
        if outcome.error is not None:
            logger.error("task %s failed: %r", task.id, outcome.error)
            return self._report_failure(runtime, error_details(outcome.error, outcome.traceback))
        try:
            check_output(task.id, outcome.output)
        except TaskOutputError as error:
            return self._report_failure(runtime, error_details(error, None))
        return self._report(runtime, "/complete", {"output": outcome.output})

    def _supervise(self, runtime: Runtime, thread: threading.Thread) -> bool:
        """Heartbeat and ship logs until the task ends; return whether the run was canceled."""
        next_heartbeat = time.monotonic() + self.heartbeat_interval_s
        while thread.is_alive():
            thread.join(LOG_FLUSH_INTERVAL_S)
            try:
                runtime.flush_logs()
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + self.heartbeat_interval_s
                    status = runtime.heartbeat()
                    if status in _FINAL_STATUSES:
                        logger.warning(
                            "run %s is %s while its task still runs; the runner stops",
                            runtime.run_id,
                            status,
                        )
                        return True
            except ChannelError as error:
                if is_stale_runner(error) or isinstance(error, ChannelUnavailableError):
                    raise
                # The task keeps running; the next tick tries again.
                logger.warning(
                    "heartbeat or log shipping of run %s failed: %s", runtime.run_id, error
                )
        return False

    def _report_failure(self, runtime: Runtime, details: dict[str, Any]) -> int:
        return self._report(runtime, "/fail", {"error": details})

    def _report(self, runtime: Runtime, suffix: str, body: dict[str, Any]) -> int:
        try:
            runtime.flush_logs()
        except ChannelError as error:
            if is_stale_runner(error):
                raise
            logger.warning(
                "shipping the last log lines of run %s failed: %s", runtime.run_id, error
            )
        try:
            runtime.call("POST", suffix, body)
        except ChannelError as error:
            if is_stale_runner(error) or isinstance(error, ChannelUnavailableError):
                raise
            logger.exception("reporting the result of run %s failed", runtime.run_id)
            return 1
        logger.info("run %s reported via %s", runtime.run_id, suffix)
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmflow.runner.agent", description=__doc__)
    parser.add_argument(
        "--list-tasks",
        action="store_true",
        help="import VMFLOW_TASK_MODULES, print the task ids as a JSON list and exit",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    modules = parse_module_list(os.environ.get("VMFLOW_TASK_MODULES", ""))
    if not modules:
        logger.error("VMFLOW_TASK_MODULES is empty; set it to the image's task modules, e.g. tasks")
        return 2
    import_failure = load_task_modules(modules)

    if args.list_tasks:
        if import_failure is not None:
            return 1
        print(json.dumps(registry.ids()))
        return 0

    socket_path = os.environ.get("VMFLOW_CHANNEL", "")
    if not socket_path:
        logger.error("VMFLOW_CHANNEL is not set; the gateway sets it to the channel socket path")
        return 2
    deadline_text = os.environ.get("VMFLOW_CHANNEL_RETRY_DEADLINE_S", "")
    try:
        retry_deadline_s = float(deadline_text) if deadline_text else DEFAULT_RETRY_DEADLINE_S
    except ValueError:
        retry_deadline_s = -1.0
    if not 0 < retry_deadline_s < float("inf"):
        logger.error(
            "VMFLOW_CHANNEL_RETRY_DEADLINE_S is %r; set it to a positive number of seconds",
            deadline_text,
        )
        return 2
    channel = ChannelClient(socket_path, retry_deadline_s=retry_deadline_s)
    try:
        return Agent(channel, import_failure).run()
    except ChannelError:
        logger.exception("the runner lost its channel at %s", socket_path)
        return 1


if __name__ == "__main__":
    sys.exit(main())
