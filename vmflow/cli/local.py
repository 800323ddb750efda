"""Local state of the CLI: the secrets `vmflow dev` generates and where the API listens.

`vmflow dev` writes `secrets.json` (mode 0600) into the data directory once and
passes the values to every process it starts. The other commands read the API
key from VMFLOW_API_KEY or, when that is unset, from the same file.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from vmflow.config import default_data_dir

SECRETS_FILE = "secrets.json"
# Written by a running `vmflow dev` (or demo) stack: where its parts listen.
STACK_FILE = "stack.json"
# Locked (flock) by the process that runs a stack on the data directory, for
# as long as the stack runs; it contains that process's pid.
STACK_LOCK_FILE = "stack.lock"
DEFAULT_API_URL = "http://127.0.0.1:8080"
DEFAULT_TEMPORAL_ADDRESS = "127.0.0.1:7233"
DEFAULT_TEMPORAL_UI_URL = "http://127.0.0.1:8233"


class LocalStateError(RuntimeError):
    """Local state is missing or unreadable; the message names the fix."""


@dataclass(frozen=True)
class LocalSecrets:
    """The secrets one machine's stack shares between its processes."""

    api_key: str
    workload_secret: str
    callback_secret: str
    gateway_token: str

    def environment(self) -> dict[str, str]:
        """Return the environment variables that hand these secrets to each process."""
        return {
            "VMFLOW_API_KEY": self.api_key,
            "VMFLOW_WORKLOAD_SECRET": self.workload_secret,
            "VMFLOW_CALLBACK_SECRET": self.callback_secret,
            "VMFLOW_GATEWAY_CALLBACK_SECRET": self.callback_secret,
            "COMPUTE_GATEWAY_AUTH_TOKEN": self.gateway_token,
            "VMFLOW_GATEWAY_AUTH_TOKEN": self.gateway_token,
        }


def secrets_path(data_dir: Path | None = None) -> Path:
    return (data_dir or default_data_dir()) / SECRETS_FILE


def load_or_create_secrets(data_dir: Path | None = None) -> LocalSecrets:
    """Read the stack's secrets, generating and storing them (mode 0600) on first use."""
    path = secrets_path(data_dir)
    if path.is_file():
        return read_secrets(path)

    path.parent.mkdir(parents=True, exist_ok=True)
    created = LocalSecrets(
        api_key=secrets.token_urlsafe(32),
        workload_secret=secrets.token_urlsafe(32),
        callback_secret=secrets.token_urlsafe(32),
        gateway_token=secrets.token_urlsafe(32),
    )
    # O_EXCL: when two commands start at once, one creates the file and the
    # other reads what it wrote.
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secrets(path)
    with os.fdopen(descriptor, "w") as file:
        json.dump(asdict(created), file)
    return created


def read_secrets(path: Path) -> LocalSecrets:
    try:
        data = json.loads(path.read_text())
        return LocalSecrets(**data)
    except (OSError, ValueError, TypeError) as error:
        raise LocalStateError(
            f"cannot read the local secrets in {path}: {error}; delete the file and run "
            "`vmflow dev` again to generate new ones"
        ) from error


def resolve_api_key(data_dir: Path | None = None) -> str:
    """Return VMFLOW_API_KEY, else the key `vmflow dev` stored, else raise `LocalStateError`."""
    configured = os.environ.get("VMFLOW_API_KEY")
    if configured:
        return configured
    path = secrets_path(data_dir)
    if path.is_file():
        return read_secrets(path).api_key
    raise LocalStateError(
        f"no API key: VMFLOW_API_KEY is unset and {path} does not exist; start the local "
        "stack with `vmflow dev` or set VMFLOW_API_KEY"
    )


@dataclass(frozen=True)
class StackAddresses:
    """Addresses of the parts of a running local stack."""

    api_url: str
    temporal_address: str
    temporal_ui_url: str
    gateway_url: str


def stack_path(data_dir: Path | None = None) -> Path:
    return (data_dir or default_data_dir()) / STACK_FILE


class StackRunningError(LocalStateError):
    """Another process runs a stack on the same data directory."""


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Take the data directory's stack lock, or raise `StackRunningError` naming its holder.

    The lock lasts until the returned file is closed or the process exits,
    so a stack that crashed leaves no stale lock behind.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / STACK_LOCK_FILE
    lock_file = path.open("a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        pid = lock_file.read().strip() or "unknown"
        lock_file.close()
        addresses = read_stack_addresses(data_dir)
        api = f"with its API at {addresses.api_url}" if addresses else "still starting"
        raise StackRunningError(
            f"a vmflow stack already runs on the data directory {data_dir} ({api}, "
            f"pid {pid}); use that stack, stop it, or pass another --data-dir"
        ) from None
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


def write_stack_addresses(data_dir: Path, addresses: StackAddresses) -> None:
    path = stack_path(data_dir)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(addresses)))
    temporary.replace(path)


def read_stack_addresses(data_dir: Path | None = None) -> StackAddresses | None:
    """Return the addresses a running stack wrote, or None when no stack wrote any."""
    try:
        return StackAddresses(**json.loads(stack_path(data_dir).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def resolve_api_url(data_dir: Path | None = None) -> str:
    """Return VMFLOW_API_URL, else the running local stack's API, else the default port."""
    configured = os.environ.get("VMFLOW_API_URL")
    if configured:
        return configured.rstrip("/")
    addresses = read_stack_addresses(data_dir)
    return addresses.api_url if addresses else DEFAULT_API_URL
