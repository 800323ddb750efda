"""Machine requirements of the benchmarks on real sandboxes, and the drivers they cover."""

from __future__ import annotations

import os

from vmflow.gateway.drivers.criu import check_configured_criu

MICROVM_LINE = (
    "microvm driver: not implemented in vmflow (only the sandbox driver exists), "
    "so no figure exists for it"
)


class SandboxUnavailableError(RuntimeError):
    """The machine cannot run real sandboxes with snapshots (no root or no CRIU 4)."""


def check_sandbox_machine() -> None:
    """Raise `SandboxUnavailableError` naming what is missing for sandboxes with snapshots."""
    if os.geteuid() != 0:
        raise SandboxUnavailableError("the sandbox driver needs root (namespaces, cgroups)")
    status = check_configured_criu()
    if not status.works:
        raise SandboxUnavailableError(f"snapshots need a working CRIU 4: {status.detail}")
