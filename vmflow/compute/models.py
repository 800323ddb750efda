"""Wire models of the compute gateway API.

Field names are the gateway's snake_case wire names, compatible with the
compute gateway that Trigger.dev's supervisor calls. Unknown fields in
responses are kept (`extra="allow"`) so a newer gateway does not break an
older client.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

Cpu = Annotated[float, Field(gt=0, le=64, description="Virtual CPUs, fractions allowed.")]
MemoryGb = Annotated[float, Field(gt=0, le=256, description="Memory in GiB, fractions allowed.")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class CallbackTarget(_Request):
    """Callback target: the URL and metadata the gateway reports a background operation's end to."""

    url: AnyHttpUrl
    metadata: dict[str, str] = Field(default_factory=dict)


class TemplateCreateRequest(_Request):
    image: str = Field(min_length=1)
    cpu: Cpu
    memory_gb: MemoryGb
    background: bool = False
    callback: CallbackTarget | None = None


class TemplateCreateResponse(_Response):
    """Result of a foreground template build; background builds return 202 with no body."""

    template_id: str | None = None
    image: str | None = None
    status: str | None = None
    duration_ms: float | None = None


class CallbackStatus(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"


class TemplateCallback(_Response):
    template_id: str | None = None
    image: str
    status: CallbackStatus
    error: str | None = None
    metadata: dict[str, str] | None = None
    duration_ms: float | None = None


class InstanceCreateRequest(_Request):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    image: str = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cpu: Cpu
    memory_gb: MemoryGb
    metadata: dict[str, str] | None = None


class InstanceCreateResponse(_Response):
    id: str
    timing: dict[str, Any] | None = Field(default=None, alias="_timing")

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class InstanceState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    SNAPSHOTTING = "snapshotting"
    STOPPED = "stopped"
    EXITED = "exited"
    DELETED = "deleted"


class Instance(_Response):
    id: str
    name: str
    image: str
    state: InstanceState
    cpu: float | None = None
    memory_gb: float | None = None
    metadata: dict[str, str] | None = None
    exit_code: int | None = None
    created_at: str | None = None


class SnapshotRequest(_Request):
    callback: CallbackTarget


class SnapshotAccepted(_Response):
    """Body of a 202 snapshot response; gateways that send none leave every field unset."""

    snapshot_id: str | None = None
    instance_id: str | None = None
    status: str | None = None


class SnapshotCallback(_Response):
    status: CallbackStatus
    snapshot_id: str | None = None
    instance_id: str
    error: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    duration_ms: float | None = None


class SnapshotRestoreRequest(_Request):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    metadata: dict[str, str] = Field(default_factory=dict)
    cpu: Cpu
    memory_gb: MemoryGb


class SnapshotRestoreResponse(_Response):
    id: str
    timing: dict[str, Any] | None = Field(default=None, alias="_timing")

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class SnapshotState(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
    DELETED = "deleted"


class Snapshot(_Response):
    id: str
    instance_id: str
    state: SnapshotState
    size_bytes: int | None = None
    error: str | None = None
    created_at: str | None = None


class DriverCapabilities(_Response):
    name: str
    available: bool
    snapshots: bool
    detail: str | None = None


class Health(_Response):
    status: str
    drivers: list[DriverCapabilities] = Field(default_factory=list)
