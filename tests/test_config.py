"""Settings: defaults, and a ConfigError naming each invalid variable and its value."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmflow.config import ConfigError, Settings, get_settings, load_settings

SETTINGS_VARIABLES = [*Settings.model_fields, "VMFLOW_DATA_DIR"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Unset every variable Settings reads; point the data directory at tmp_path."""
    for name in SETTINGS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_defaults_serve_one_machine(clean_environment: Path) -> None:
    settings = load_settings()

    assert settings.COMPUTE_GATEWAY_URL is None
    assert settings.COMPUTE_GATEWAY_AUTH_TOKEN is None
    assert settings.COMPUTE_GATEWAY_TIMEOUT_MS == 30_000
    assert settings.gateway_timeout_s == 30.0
    assert settings.COMPUTE_SNAPSHOTS_ENABLED is True
    assert settings.COMPUTE_SNAPSHOT_DELAY_MS == 5_000
    assert settings.COMPUTE_SNAPSHOT_DISPATCH_LIMIT == 10
    assert settings.COMPUTE_TEMPLATE_SHADOW_ROLLOUT_PCT == 0
    assert settings.TEMPORAL_ADDRESS == "127.0.0.1:7233"
    assert settings.TEMPORAL_NAMESPACE == "default"
    assert str(settings.VMFLOW_API_URL) == "http://127.0.0.1:8080/"
    assert settings.VMFLOW_API_KEY is None
    assert settings.VMFLOW_WORKLOAD_TOKEN_TTL_S == 7 * 86_400
    expected_db = clean_environment / "home" / ".local" / "share" / "vmflow" / "vmflow.db"
    assert settings.DATABASE_URL == f"sqlite:///{expected_db}"


def test_data_dir_moves_the_default_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VMFLOW_DATA_DIR", str(tmp_path / "state"))

    assert load_settings().DATABASE_URL == f"sqlite:///{tmp_path / 'state' / 'vmflow.db'}"


def test_valid_values_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPUTE_GATEWAY_URL", "http://127.0.0.1:8090")
    monkeypatch.setenv("COMPUTE_GATEWAY_AUTH_TOKEN", "s3cret")
    monkeypatch.setenv("COMPUTE_GATEWAY_TIMEOUT_MS", "1500")
    monkeypatch.setenv("COMPUTE_SNAPSHOTS_ENABLED", "false")
    monkeypatch.setenv("COMPUTE_TEMPLATE_SHADOW_ROLLOUT_PCT", "12.5")
    monkeypatch.setenv("TEMPORAL_ADDRESS", "temporal.internal:7233")
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://vmflow@db/vmflow")

    settings = load_settings()

    assert str(settings.COMPUTE_GATEWAY_URL) == "http://127.0.0.1:8090/"
    assert settings.COMPUTE_GATEWAY_AUTH_TOKEN is not None
    assert settings.COMPUTE_GATEWAY_AUTH_TOKEN.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.gateway_timeout_s == 1.5
    assert settings.COMPUTE_SNAPSHOTS_ENABLED is False
    assert settings.COMPUTE_TEMPLATE_SHADOW_ROLLOUT_PCT == 12.5
    assert settings.TEMPORAL_ADDRESS == "temporal.internal:7233"
    assert settings.DATABASE_URL == "postgresql+psycopg://vmflow@db/vmflow"


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("COMPUTE_SNAPSHOT_DELAY_MS", "-1", "greater than or equal to 0"),
        ("COMPUTE_TEMPLATE_SHADOW_ROLLOUT_PCT", "101", "less than or equal to 100"),
        ("COMPUTE_TEMPLATE_SHADOW_ROLLOUT_PCT", "-0.5", "greater than or equal to 0"),
        ("COMPUTE_GATEWAY_URL", "gateway.local:8000", "scheme"),
        ("COMPUTE_GATEWAY_URL", "127.0.0.1:8000", "URL"),
        ("COMPUTE_GATEWAY_TIMEOUT_MS", "0", "greater than 0"),
        ("COMPUTE_SNAPSHOT_DISPATCH_LIMIT", "0", "greater than or equal to 1"),
        ("TEMPORAL_ADDRESS", "localhost", "HOST:PORT"),
        ("TEMPORAL_ADDRESS", "localhost:70000", "HOST:PORT"),
        ("TEMPORAL_ADDRESS", ":7233", "HOST:PORT"),
        ("DATABASE_URL", "mysql://root@localhost/vmflow", "sqlite:///PATH"),
        ("DATABASE_URL", "postgresql", "sqlite:///PATH"),
        ("DATABASE_URL", "sqlitefoo:///x.db", "sqlite:///PATH"),
        ("COMPUTE_SNAPSHOTS_ENABLED", "maybe", "boolean"),
    ],
)
def test_invalid_variable_is_named_with_its_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, reason: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigError) as caught:
        load_settings()

    message = str(caught.value)
    assert f"{variable}={value!r}" in message
    assert reason in message
    assert caught.value.__cause__ is None  # pydantic's traceback is not chained in


def test_every_invalid_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPUTE_SNAPSHOT_DELAY_MS", "-5")
    monkeypatch.setenv("TEMPORAL_ADDRESS", "nowhere")
    monkeypatch.setenv("COMPUTE_GATEWAY_TIMEOUT_MS", "30000")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    lines = str(caught.value).splitlines()
    assert any(line.strip().startswith("COMPUTE_SNAPSHOT_DELAY_MS='-5'") for line in lines)
    assert any(line.strip().startswith("TEMPORAL_ADDRESS='nowhere'") for line in lines)
    assert not any("COMPUTE_GATEWAY_TIMEOUT_MS" in line for line in lines)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_get_settings_reads_once_until_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEMPORAL_NAMESPACE", "first")
    assert get_settings().TEMPORAL_NAMESPACE == "first"

    monkeypatch.setenv("TEMPORAL_NAMESPACE", "second")
    assert get_settings().TEMPORAL_NAMESPACE == "first"

    get_settings.cache_clear()
    assert get_settings().TEMPORAL_NAMESPACE == "second"
