"""The gateway's records of instances, snapshots and templates, kept as JSON files.

Each record is one file under `<state dir>/records/<kind>/<id>.json`, replaced atomically
on every change, so the gateway finds its state again after a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from vmflow.compute.models import CallbackTarget, InstanceState, SnapshotState

logger = logging.getLogger(__name__)

RecordT = TypeVar("RecordT", bound="Record")


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class TemplateState(StrEnum):
    BUILDING = "building"
    COMPLETED = "completed"
    FAILED = "failed"


class Record(BaseModel):
    id: str
    created_at: str = Field(default_factory=now_iso)


class InstanceRecord(Record):
    """An instance; `env` is the process view, without the two gateway-only variables."""

    name: str
    image: str
    image_digest: str
    state: InstanceState = InstanceState.STARTING
    cpu: float
    memory_gb: float
    env: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] | None = None
    workload_url: str | None = None
    workload_token: str | None = None
    generation: int = 0
    restored_from: str | None = None
    template_id: str | None = None
    # Set on the internal instance that a template build boots and checkpoints.
    template_build: bool = False
    exit_code: int | None = None
    runtime: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None

    @property
    def visible(self) -> bool:
        """Whether the instance routes show this record: not deleted, not a template build's."""
        return self.state != InstanceState.DELETED and not self.template_build


class SnapshotRecord(Record):
    """A checkpoint: a snapshot of an instance, or the checkpoint behind a template."""

    instance_id: str
    instance_name: str
    image: str
    image_digest: str
    state: SnapshotState = SnapshotState.PENDING
    env: dict[str, str] = Field(default_factory=dict)
    workload_url: str | None = None
    workload_token: str | None = None
    generation: int = 0
    size_bytes: int | None = None
    error: str | None = None
    duration_ms: float | None = None
    timing: dict[str, float] | None = None
    template_id: str | None = None
    # Where the snapshot's callback goes, kept so a restarted gateway can still send it.
    callback: CallbackTarget | None = None


class TemplateRecord(Record):
    image: str
    image_digest: str
    state: TemplateState = TemplateState.BUILDING
    cpu: float
    memory_gb: float
    snapshot_id: str | None = None
    error: str | None = None
    duration_ms: float | None = None


class RecordStore:
    """Reads and writes the records of one kind in one directory."""

    def __init__(self, directory: Path, model: type[RecordT]) -> None:
        self.directory = directory
        self.model = model
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, record: Record) -> None:
        path = self.directory / f"{record.id}.json"
        temporary = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        temporary.write_text(record.model_dump_json(indent=2))
        os.replace(temporary, path)

    def delete(self, record_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{record_id}.json").unlink()

    def load_all(self) -> list[Any]:
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(self.model.model_validate_json(path.read_text()))
            except (OSError, ValidationError) as error:
                logger.error("skipping unreadable record %s: %s", path, error)
        return records
