"""Settings read from the environment, validated once at start-up.

Every component reads the same `Settings`; each one checks only the values it
needs (the API requires its key, the worker requires Temporal's address).
Defaults serve one machine: a SQLite file, a local Temporal dev server, and a
gateway on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AnyHttpUrl, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """Return the directory for local state: VMFLOW_DATA_DIR, else ~/.local/share/vmflow."""
    configured = os.environ.get("VMFLOW_DATA_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".local" / "share" / "vmflow"


def configure_logging() -> None:
    """Configure root logging at the level VMFLOW_LOG_LEVEL names (INFO by default)."""
    logging.basicConfig(
        level=os.environ.get("VMFLOW_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class ConfigError(ValueError):
    """Raised when an environment variable has a value outside its accepted range."""


class Settings(BaseSettings):
    """vmflow configuration; each field is read from the environment variable of its name."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", env_file=None)

    COMPUTE_GATEWAY_URL: AnyHttpUrl | None = Field(
        default=None,
        description="Base URL of the compute gateway; unset means no gateway, so templates skip.",
    )
    COMPUTE_GATEWAY_AUTH_TOKEN: SecretStr | None = Field(
        default=None, description="Bearer token sent to the gateway."
    )
    COMPUTE_GATEWAY_TIMEOUT_MS: Annotated[int, Field(gt=0, le=600_000)] = 30_000
    COMPUTE_SNAPSHOTS_ENABLED: bool = True
    COMPUTE_SNAPSHOT_DELAY_MS: Annotated[int, Field(ge=0, le=86_400_000)] = 5_000
    COMPUTE_SNAPSHOT_DISPATCH_LIMIT: Annotated[int, Field(ge=1, le=1_000)] = 10
    COMPUTE_TRACE_OTLP_ENDPOINT: AnyHttpUrl | None = Field(
        default=None, description="OTLP/HTTP traces endpoint for compute spans."
    )
    COMPUTE_TEMPLATE_SHADOW_ROLLOUT_PCT: Annotated[float, Field(ge=0, le=100)] = 0
    OTEL_EXPORTER_OTLP_ENDPOINT: AnyHttpUrl | None = Field(
        default=None, description="OTLP/HTTP endpoint for Temporal's tracing interceptor."
    )
    TEMPORAL_ADDRESS: str = "127.0.0.1:7233"
    TEMPORAL_NAMESPACE: str = "default"
    DATABASE_URL: str = Field(
        default_factory=lambda: f"sqlite:///{default_data_dir() / 'vmflow.db'}",
        description="SQLAlchemy URL, a SQLite file by default or postgresql+psycopg://…",
    )
    VMFLOW_API_URL: AnyHttpUrl = Field(
        default=AnyHttpUrl("http://127.0.0.1:8080"),
        description="Where the supervisor API listens; gateways call back and proxy to it here.",
    )
    VMFLOW_API_KEY: SecretStr | None = Field(
        default=None, description="Bearer key for the platform routes of the supervisor API."
    )
    VMFLOW_WORKLOAD_SECRET: SecretStr | None = Field(
        default=None, description="HMAC key that signs per-run workload tokens."
    )
    VMFLOW_CALLBACK_SECRET: SecretStr | None = Field(
        default=None, description="HMAC key that gateways sign their callbacks with."
    )
    VMFLOW_WORKLOAD_TOKEN_TTL_S: Annotated[int, Field(gt=0, le=30 * 86_400)] = 7 * 86_400

    @field_validator("TEMPORAL_ADDRESS")
    @classmethod
    def _check_temporal_address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT such as 127.0.0.1:7233, got {value!r}")
        return value

    @field_validator("DATABASE_URL")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        scheme, separator, _ = value.partition("://")
        if not separator or scheme.split("+", 1)[0] not in ("sqlite", "postgresql"):
            raise ValueError(
                f"expected a sqlite:///PATH or postgresql+psycopg://… URL, got {value!r}"
            )
        return value

    @property
    def gateway_timeout_s(self) -> float:
        return self.COMPUTE_GATEWAY_TIMEOUT_MS / 1000


def format_validation_error(error: ValidationError) -> str:
    """Render each invalid variable as `NAME=value: reason` on its own line."""
    lines = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "settings"
        lines.append(f"{name}={item.get('input')!r}: {item['msg']}")
    return "invalid vmflow configuration:\n  " + "\n  ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Read the environment into `Settings`, raising `ConfigError` that names each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once."""
    return load_settings()
