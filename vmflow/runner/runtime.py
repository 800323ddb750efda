"""The state of the run a runner executes: its identity, waits, heartbeats and log shipping.

One `Runtime` exists per runner process once its run has started; the SDK's
`wait` and `get_context` reach it through `current_runtime()`.

Every request that carries the runner id first reads the instance's
identity from the channel. When the generation or the runner id changed, the
process woke inside a restored snapshot: the runtime adopts the new runner
id and calls resume before anything else. A wait keeps `_lock` while it
ships buffered logs, sends its suspend request and sets `_suspended`. While
that flag is set the agent's heartbeats and log shipping pause, and the wait
alone polls the channel.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmflow.runner.channel import ChannelClient, InstanceIdentity, WorkloadAPIError
from vmflow.runner.errors import NoRunContextError, WaitpointTimeoutError

logger = logging.getLogger(__name__)

WORKLOAD_PREFIX = "/api/v1/workload"

# How often a suspended runner checks its identity and its waitpoint; each
# check is two short requests with no connection left open in between.
WAIT_POLL_INTERVAL_S = 0.2

# Lines kept while the run log cannot be shipped; older lines are dropped first.
MAX_BUFFERED_LOG_LINES = 10_000
LOG_LINES_PER_REQUEST = 500
MAX_LOG_MESSAGE_CHARS = 16_384


@dataclass(frozen=True)
class Execution:
    """The run to execute, as the workload API's start route returns it."""

    run_id: str
    task_id: str
    payload: Any
    attempt: int
    deployment_id: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Execution:
        return cls(
            run_id=str(data["run_id"]),
            task_id=str(data["task_id"]),
            payload=data.get("payload"),
            attempt=int(data["attempt"]),
            deployment_id=str(data["deployment_id"]),
        )


@dataclass(frozen=True)
class Token:
    """A TOKEN waitpoint; complete it from outside with its `id`."""

    id: str
    timeout_at: datetime | None


class RunLogHandler(logging.Handler):
    """Buffers log records for the run's log; the runtime ships them in batches."""

    def __init__(self, runtime: Runtime, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._runtime = runtime

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._runtime.buffer_log_line(record.levelname, message, record.created)


_current: Runtime | None = None


def to_utf8_text(text: str) -> str:
    """Return `text` with each lone UTF-16 surrogate written as a `\\udXXX` escape.

    The workload API rejects strings that are not valid UTF-8, so a log line
    or an error message sent with a lone surrogate would be rejected.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def current_runtime() -> Runtime:
    """Return the runtime of the running task, raising `NoRunContextError` outside a run."""
    if _current is None:
        raise NoRunContextError(
            "no run is executing in this process; wait.* and get_context() work only "
            "inside a task started by the vmflow runner"
        )
    return _current


def set_current_runtime(runtime: Runtime | None) -> None:
    global _current
    _current = runtime


class Runtime:
    """The run being executed and the runner's current identity."""

    def __init__(
        self, channel: ChannelClient, identity: InstanceIdentity, runner_id: str, run_id: str
    ) -> None:
        self.channel = channel
        self.run_id = run_id
        self.runner_id = runner_id
        self.generation = identity.generation
        self.instance_id = identity.id
        self.execution: Execution | None = None
        self.wait_poll_interval_s = WAIT_POLL_INTERVAL_S

        self._lock = threading.RLock()
        self._wait_lock = threading.Lock()
        self._suspended = False
        self._wait_sequence = 0
        self._execution_snapshot_id = 0
        self._last_waitpoint_id: str | None = None

        self._log_lock = threading.Lock()
        self._log_buffer: deque[dict[str, str]] = deque(maxlen=MAX_BUFFERED_LOG_LINES)
        self._dropped_log_lines = 0

    # -- requests ------------------------------------------------------------

    def _path(self, suffix: str) -> str:
        return f"{WORKLOAD_PREFIX}/runs/{self.run_id}{suffix}"

    def call(self, method: str, suffix: str, body: dict[str, Any] | None = None) -> Any:
        """Send a workload API request as the current runner.

        The identity is checked first, because a snapshot may have been taken
        after the last wait ended, and the supervisor still accepts the old
        runner id until the new one resumes. A request rejected as stale is
        repeated once after another identity check.
        """
        self.check_identity()
        for attempt in (1, 2):
            payload = None if body is None else {**body, "runner_id": self.runner_id}
            try:
                return self.channel.request(method, self._path(suffix), payload)
            except WorkloadAPIError as error:
                if error.code != "stale_runner" or attempt == 2:
                    raise
                if not self.check_identity():
                    raise
        raise AssertionError("unreachable")

    def check_identity(self) -> bool:
        """Adopt a new identity after a restore and call resume; return whether it changed."""
        identity = self.channel.instance()
        with self._lock:
            same_runner = identity.runner_id in (None, self.runner_id)
            if identity.generation == self.generation and same_runner:
                return False

            previous_runner_id = self.runner_id
            self.runner_id = identity.runner_id or self.runner_id
            self.generation = identity.generation
            self.instance_id = identity.id
            logger.info(
                "runner %s woke inside a restored snapshot (%s) on instance %s, generation %d; "
                "it was runner %s",
                self.runner_id,
                identity.restored_from or "unknown snapshot",
                identity.id,
                identity.generation,
                previous_runner_id,
            )
            if self._last_waitpoint_id is None:
                logger.warning(
                    "run %s changed identity before any waitpoint; nothing to resume", self.run_id
                )
                return True
            self.channel.request(
                "POST",
                self._path("/resume"),
                {"runner_id": self.runner_id, "waitpoint_id": self._last_waitpoint_id},
            )
            return True

    # -- heartbeats and logs -------------------------------------------------

    def heartbeat(self) -> str | None:
        """Send a heartbeat unless suspended; return the run's status as the API reports it."""
        with self._lock:
            if self._suspended:
                return None
            state = self.call("POST", "/heartbeat", {})
        return str(state["status"])

    def buffer_log_line(self, level: str, message: str, created: float) -> None:
        message = to_utf8_text(message)
        if len(message) > MAX_LOG_MESSAGE_CHARS:
            message = message[: MAX_LOG_MESSAGE_CHARS - 20] + " …[truncated]"
        line = {
            "level": level if level in _LOG_LEVELS else "INFO",
            "message": message,
            "ts": datetime.fromtimestamp(created, UTC).isoformat(),
        }
        with self._log_lock:
            if len(self._log_buffer) == self._log_buffer.maxlen:
                self._dropped_log_lines += 1
            self._log_buffer.append(line)

    def flush_logs(self) -> None:
        """Ship buffered log lines unless suspended; lines that fail to ship stay buffered."""
        with self._lock:
            if not self._suspended:
                self._ship_logs_locked()

    def _ship_logs_locked(self) -> None:
        while True:
            with self._log_lock:
                batch = [
                    self._log_buffer.popleft()
                    for _ in range(min(LOG_LINES_PER_REQUEST, len(self._log_buffer)))
                ]
                dropped, self._dropped_log_lines = self._dropped_log_lines, 0
            if dropped:
                batch.insert(
                    0,
                    {
                        "level": "WARNING",
                        "message": f"{dropped} log lines were dropped: the run log was unreachable",
                        "ts": datetime.now(UTC).isoformat(),
                    },
                )
            if not batch:
                return
            try:
                self.call("POST", "/logs", {"lines": batch})
            except Exception:
                with self._log_lock:
                    self._log_buffer.extendleft(reversed(batch))
                raise

    # -- waits ---------------------------------------------------------------

    def wait_for_duration(self, resume_at: datetime | None, duration_ms: int | None) -> None:
        with self._wait_lock:
            body: dict[str, Any] = {"kind": "DURATION", "idempotency_key": self._next_wait_key()}
            if duration_ms is not None:
                body["duration_ms"] = duration_ms
            else:
                assert resume_at is not None
                body["until"] = resume_at.isoformat()
            waitpoint = self.call("POST", "/waitpoints", body)
            logger.info("waiting until %s (waitpoint %s)", waitpoint["resume_at"], waitpoint["id"])
            self._wait_on(waitpoint)

    def create_token(self, timeout_ms: int | None, key: str | None) -> Token:
        with self._wait_lock:
            idempotency_key = self._next_wait_key() if key is None else self._token_key(key)
            body: dict[str, Any] = {"kind": "TOKEN", "idempotency_key": idempotency_key}
            if timeout_ms is not None:
                body["timeout_ms"] = timeout_ms
            waitpoint = self.call("POST", "/waitpoints", body)
        timeout_at = waitpoint.get("timeout_at")
        return Token(
            id=waitpoint["id"],
            timeout_at=datetime.fromisoformat(timeout_at) if timeout_at else None,
        )

    def wait_for_token(self, token: Token) -> Any:
        with self._wait_lock:
            waitpoint = self.channel.request("GET", self._path(f"/waitpoints/{token.id}"))
            logger.info("waiting for token %s", token.id)
            return self._wait_on(waitpoint)

    def _next_wait_key(self) -> str:
        # Deterministic, so a create that is retried, or repeated after a
        # restore, names the same waitpoint.
        self._wait_sequence += 1
        attempt = self.execution.attempt if self.execution else 1
        return f"attempt-{attempt}/wait-{self._wait_sequence}"

    def _token_key(self, key: str) -> str:
        attempt = self.execution.attempt if self.execution else 1
        return f"attempt-{attempt}/token/{key}"

    def _wait_on(self, waitpoint: dict[str, Any]) -> Any:
        """Suspend at `waitpoint`, poll until it is final, and return its output."""
        waitpoint_id = str(waitpoint["id"])
        with self._lock:
            # The waitpoint a restored runner names in its resume request.
            self._last_waitpoint_id = waitpoint_id
        if waitpoint["status"] != "PENDING":
            return self._result(waitpoint)

        with self._lock:
            self._ship_logs_locked()
            self._execution_snapshot_id += 1
            response = self.call(
                "POST",
                "/suspend",
                {
                    "waitpoint_id": waitpoint_id,
                    "execution_snapshot_id": self._execution_snapshot_id,
                },
            )
            self._suspended = bool(response["suspended"])
        if not self._suspended:
            return self._result(response["waitpoint"])

        # From here until the waitpoint is final the instance may be
        # snapshotted and restored at any moment, so every request is short
        # and the identity is checked before each poll and once more at the end.
        # check_identity() sends resume after every restore. A wait without a
        # restore sends it at the end, so the supervisor learns the runner
        # continues in place.
        resumed = False
        try:
            while True:
                resumed = self.check_identity() or resumed
                current = self.channel.request("GET", self._path(f"/waitpoints/{waitpoint_id}"))
                if current["status"] != "PENDING":
                    resumed = self.check_identity() or resumed
                    if not resumed:
                        self.call("POST", "/resume", {"waitpoint_id": waitpoint_id})
                    return self._result(current)
                time.sleep(self.wait_poll_interval_s)
        finally:
            with self._lock:
                self._suspended = False

    @staticmethod
    def _result(waitpoint: dict[str, Any]) -> Any:
        if waitpoint["status"] == "COMPLETED":
            return waitpoint.get("output")
        raise WaitpointTimeoutError(
            f"token {waitpoint['id']} was not completed before its timeout at "
            f"{waitpoint.get('timeout_at')}",
            waitpoint_id=str(waitpoint["id"]),
        )


_LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
