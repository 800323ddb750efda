"""Settings of the gateway service, read from VMFLOW_GATEWAY_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from vmflow.config import ConfigError, default_data_dir, format_validation_error


class GatewaySettings(BaseSettings):
    """Gateway configuration; each field is read from VMFLOW_GATEWAY_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="VMFLOW_GATEWAY_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="Address the HTTP service binds to.")
    port: Annotated[int, Field(ge=0, le=65535)] = 8020
    auth_token: SecretStr | None = Field(
        default=None, description="Bearer token every request must carry."
    )
    callback_secret: SecretStr | None = Field(
        default=None, description="HMAC key that signs callbacks (X-Vmflow-Signature)."
    )
    state_dir: Path = Field(
        default_factory=lambda: default_data_dir() / "gateway",
        description="Instances, snapshots and templates, kept across restarts.",
    )
    image_dir: Path = Field(
        default_factory=lambda: default_data_dir() / "images",
        description="Local image store that `vmflow image build` writes to.",
    )
    max_body_bytes: Annotated[int, Field(gt=0)] = 1024 * 1024
    criu: str | None = Field(
        default=None, description="Path of the criu binary; unset means `criu` on PATH."
    )
    pids_max: Annotated[int, Field(ge=8, le=1_000_000)] = 512
    max_cpu: Annotated[float, Field(gt=0)] = Field(
        default_factory=lambda: float(os.cpu_count() or 1),
        description="Largest `cpu` a request may ask for; defaults to the host's CPU count.",
    )
    min_memory_gb: Annotated[float, Field(gt=0)] = 0.0625
    ready_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    drain_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    callback_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    cgroup_parent: str = Field(
        default="vmflow", description="cgroup v1 directory, under each controller, for instances."
    )
    delete_instances_on_exit: bool = Field(
        default=False,
        description="Delete every instance when the gateway stops; snapshots stay. By default "
        "instances keep running, so a restarted gateway finds them.",
    )


def load_gateway_settings(**overrides: object) -> GatewaySettings:
    """Read the environment into `GatewaySettings`, raising `ConfigError` naming each bad value."""
    try:
        return GatewaySettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
