"""The interface between the gateway service and the drivers that isolate instances.

The service owns records, names, callbacks and the channel; a driver owns processes,
limits and checkpoint images. A microVM driver implements the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vmflow.compute.models import DriverCapabilities
from vmflow.gateway.images import Image


@dataclass(frozen=True)
class LaunchSpec:
    """The instance to start: its identity, image, process environment and limits.

    `instance_dir` is private to the instance and created by the service; the driver keeps
    its scratch directory, output and channel socket there.
    """

    instance_id: str
    image: Image
    env: dict[str, str]
    cpu: float
    memory_gb: float
    instance_dir: Path


@dataclass
class Runtime:
    """A started instance as the driver tracks it; stored with the instance record."""

    pid: int
    start_time: int
    driver: str
    details: dict[str, str] = field(default_factory=dict)
    # Milliseconds per phase of the start or restore, reported in `_timing`.
    timing: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointResult:
    size_bytes: int
    timing: dict[str, float]


class Driver(Protocol):
    """Starts, stops, checkpoints and restores instances of one kind."""

    name: str

    def capabilities(self) -> DriverCapabilities: ...

    def channel_socket(self, instance_dir: Path) -> Path:
        """Return where, on the host, the instance's channel socket must listen."""
        ...

    def output_path(self, instance_dir: Path) -> Path:
        """Return the file that keeps the instance's stdout and stderr."""
        ...

    async def start(self, spec: LaunchSpec) -> Runtime:
        """Boot the image's runtime cold; raise `SandboxError` leaving nothing behind."""
        ...

    async def restore(self, spec: LaunchSpec, snapshot_dir: Path) -> Runtime:
        """Start an instance from a checkpoint in `snapshot_dir`, under `spec`'s identity."""
        ...

    async def checkpoint(
        self, runtime: Runtime, spec: LaunchSpec, snapshot_dir: Path
    ) -> CheckpointResult:
        """Write the instance's memory and files to `snapshot_dir` and stop the instance."""
        ...

    async def recover_checkpoint(
        self, runtime: Runtime | None, spec: LaunchSpec, snapshot_dir: Path
    ) -> CheckpointResult | None:
        """Finish a checkpoint begun before a gateway restart; None when it cannot be used."""
        ...

    async def stop(self, runtime: Runtime | None, instance_id: str) -> None:
        """Kill the instance's processes and release its limits; idempotent."""
        ...

    def is_alive(self, runtime: Runtime) -> bool: ...

    def release_shared(self) -> None:
        """Remove host resources that instances share, if none is in use; best effort."""
        ...

    async def wait(self, runtime: Runtime) -> None:
        """Return once the instance's processes have exited."""
        ...

    def exit_code(self, runtime: Runtime) -> int | None:
        """Return the exit code of an exited instance, None while it runs or if unknown."""
        ...
