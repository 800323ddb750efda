"""`vmflow dev` and `vmflow api serve` as real processes."""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from vmflow.cli.local import (
    StackAddresses,
    lock_data_dir,
    read_secrets,
    read_stack_addresses,
    secrets_path,
    write_stack_addresses,
)
from vmflow.cli.main import app

VMFLOW = [sys.executable, "-m", "vmflow.cli.main"]
PARTS = ("temporal", "gateway", "api", "worker")
PR_SET_PDEATHSIG = 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that exited but was not reaped yet is a zombie, not a running process.
    status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    return status != "Z"


def _read_until(process: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    """Read the process's output until it contains `marker`; fail after `timeout_s`."""
    assert process.stdout is not None
    output = ""
    deadline = time.monotonic() + timeout_s
    while marker not in output:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            raise AssertionError(f"{marker!r} not printed within {timeout_s} s:\n{output}")
        readable, _, _ = select.select([process.stdout], [], [], min(remaining, 1.0))
        if readable:
            chunk = os.read(process.stdout.fileno(), 65536).decode(errors="replace")
            output += chunk
    return output


def _die_with_parent() -> None:
    # If pytest itself is killed, the dev process gets SIGTERM and stops its children.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@pytest.mark.slow
def test_dev_starts_all_parts_and_stops_them(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    environment = {
        **os.environ,
        "COLUMNS": "250",
        "VMFLOW_GATEWAY_CGROUP_PARENT": f"vmflow-test-dev-{os.getpid()}",
    }
    environment.pop("VMFLOW_API_KEY", None)
    environment.pop("DATABASE_URL", None)
    command = [*VMFLOW, "dev", "--data-dir", str(data_dir)]
    for option in ("--temporal-port", "--temporal-ui-port", "--api-port", "--gateway-port"):
        command += [option, "0"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        preexec_fn=_die_with_parent,
    )
    try:
        output = _read_until(process, "Ctrl-C to stop", timeout_s=120)
        pids = {
            match.group(1): int(match.group(2))
            for match in re.finditer(r"(temporal|gateway|api|worker)\s+│.*?│\s+(\d+)\s+│", output)
        }
        api_url = re.search(r"VMFLOW_API_URL=(http://127\.0\.0\.1:\d+)", output)
        assert api_url, output
        assert set(pids) == set(PARTS), output
        for part in PARTS:
            assert _alive(pids[part]), part
        assert read_stack_addresses(data_dir) is not None

        # Secrets live in the data directory, readable only by their owner.
        assert secrets_path(data_dir).stat().st_mode & 0o777 == 0o600
        api_key = read_secrets(secrets_path(data_dir)).api_key
        healthy = httpx.get(f"{api_url.group(1)}/healthz", timeout=10)
        unauthenticated = httpx.get(f"{api_url.group(1)}/api/v1/runs", timeout=10)
        authenticated = httpx.get(
            f"{api_url.group(1)}/api/v1/runs",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=10,
        )
        assert healthy.status_code == 200
        assert unauthenticated.status_code == 401
        assert authenticated.status_code == 200

        # A second stack on the same data directory is rejected and leaves
        # the first one's stack.json in place.
        second = subprocess.run(
            command, capture_output=True, text=True, timeout=60, env=environment
        )
        assert second.returncode == 1, second.stdout
        assert "already runs on the data directory" in second.stderr
        assert api_url.group(1) in second.stderr
        assert f"pid {process.pid}" in second.stderr
        assert read_stack_addresses(data_dir) is not None

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    for part in PARTS:
        assert not _alive(pids[part]), f"{part} (pid {pids[part]}) still runs"
    for log in PARTS:
        assert (data_dir / "logs" / f"{log}.log").is_file()
    assert (data_dir / "temporal.db").is_file()
    assert read_stack_addresses(data_dir) is None
    secrets = read_secrets(secrets_path(data_dir))
    for part in PARTS:
        log_text = (data_dir / "logs" / f"{part}.log").read_text()
        for name, value in vars(secrets).items():
            assert value not in log_text, f"{part}'s log contains the {name}"


def test_dev_rejects_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        completed = subprocess.run(
            [
                *VMFLOW,
                "dev",
                "--data-dir",
                str(tmp_path),
                "--api-port",
                str(port),
                *("--temporal-port", "0", "--temporal-ui-port", "0", "--gateway-port", "0"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "250"},
        )
    assert completed.returncode == 1
    assert f"port {port} for the API" in completed.stderr
    assert "--api-port" in completed.stderr


def test_dev_rejects_locked_data_dir(tmp_path: Path) -> None:
    addresses = StackAddresses(
        api_url="http://127.0.0.1:18080",
        temporal_address="127.0.0.1:17233",
        temporal_ui_url="http://127.0.0.1:18233",
        gateway_url="http://127.0.0.1:18020",
    )
    lock_file = lock_data_dir(tmp_path)
    try:
        write_stack_addresses(tmp_path, addresses)
        completed = subprocess.run(
            [*VMFLOW, "dev", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "250"},
        )
    finally:
        lock_file.close()
    assert completed.returncode == 1
    assert "already runs on the data directory" in completed.stderr
    assert "http://127.0.0.1:18080" in completed.stderr
    assert f"pid {os.getpid()}" in completed.stderr
    assert "--data-dir" in completed.stderr
    assert read_stack_addresses(tmp_path) == addresses


def test_data_dir_lock_is_released_on_close(tmp_path: Path) -> None:
    lock_data_dir(tmp_path).close()
    lock_data_dir(tmp_path).close()


def test_api_serve_without_key_exits_2(tmp_path: Path) -> None:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VMFLOW_API_KEY", "VMFLOW_WORKLOAD", "VMFLOW_CALLBACK"))
    }
    environment["DATABASE_URL"] = f"sqlite:///{tmp_path / 'vmflow.db'}"
    completed = subprocess.run(
        [*VMFLOW, "api", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )
    assert completed.returncode == 2
    assert "VMFLOW_API_KEY is not set" in completed.stderr


def test_dev_help_shows_snapshot_delay_default() -> None:
    result = CliRunner().invoke(app, ["dev", "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    assert "--snapshot-delay-ms" in result.output
    assert "[default: (COMPUTE_SNAPSHOT_DELAY_MS, else 5000)]" in result.output
