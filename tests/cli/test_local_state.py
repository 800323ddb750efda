"""The secrets file of the local stack and how commands find the API key."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from vmflow.cli.local import (
    LocalStateError,
    load_or_create_secrets,
    resolve_api_key,
    secrets_path,
)


def test_secrets_created_once_with_mode_0600(tmp_path: Path) -> None:
    created = load_or_create_secrets(tmp_path)
    again = load_or_create_secrets(tmp_path)

    mode = stat.S_IMODE(secrets_path(tmp_path).stat().st_mode)
    assert mode == 0o600
    assert again == created
    assert len({created.api_key, created.workload_secret, created.callback_secret}) == 3


def test_secrets_environment_shares_callback_secret(tmp_path: Path) -> None:
    environment = load_or_create_secrets(tmp_path).environment()
    assert environment["VMFLOW_CALLBACK_SECRET"] == environment["VMFLOW_GATEWAY_CALLBACK_SECRET"]
    assert environment["COMPUTE_GATEWAY_AUTH_TOKEN"] == environment["VMFLOW_GATEWAY_AUTH_TOKEN"]


def test_api_key_prefers_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = load_or_create_secrets(tmp_path)
    monkeypatch.setenv("VMFLOW_API_KEY", "from-environment")
    assert resolve_api_key(tmp_path) == "from-environment"
    monkeypatch.delenv("VMFLOW_API_KEY")
    assert resolve_api_key(tmp_path) == stored.api_key


def test_api_key_missing_names_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMFLOW_API_KEY", raising=False)
    with pytest.raises(LocalStateError, match="vmflow dev"):
        resolve_api_key(tmp_path)


def test_corrupt_secrets_file_names_fix(tmp_path: Path) -> None:
    secrets_path(tmp_path).write_text("{not json")
    with pytest.raises(LocalStateError, match="delete the file"):
        load_or_create_secrets(tmp_path)
