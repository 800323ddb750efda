"""Running CRIU: locating it, checking that it works here, and dump and restore calls.

CRIU 3.x cannot dump on kernels 6.13 and newer ("Unexpected rt vDSO area bounds",
because those kernels add a [vvar_vclock] mapping), so only CRIU 4 counts as working.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmflow.gateway.errors import CriuError

logger = logging.getLogger(__name__)

MIN_MAJOR_VERSION = 4
# How many lines of CRIU's log an error message quotes.
_LOG_TAIL_LINES = 6


@dataclass(frozen=True)
class CriuStatus:
    """Whether CRIU can take snapshots here, and why not when it cannot."""

    path: str | None
    version: str | None
    works: bool
    detail: str


def find_criu(configured: str | None) -> str | None:
    """Return the configured criu path, else `criu` on PATH (or /usr/local/bin)."""
    if configured:
        return configured
    return shutil.which("criu") or shutil.which(
        "criu", path="/usr/local/bin:/usr/local/sbin:/usr/sbin"
    )


def check_criu(path: str | None) -> CriuStatus:
    """Run `criu --version` and `criu check`; return a status that names what is missing."""
    if path is None:
        return CriuStatus(
            None, None, False, "criu not found; install CRIU 4 with scripts/install-criu.sh"
        )
    try:
        version_run = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return CriuStatus(path, None, False, f"cannot run {path} --version: {error}")
    match = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", version_run.stdout)
    if match is None:
        return CriuStatus(path, None, False, f"{path} --version printed no version")
    version = match.group(0).split(":", 1)[1].strip()
    if int(match.group(1)) < MIN_MAJOR_VERSION:
        return CriuStatus(
            path,
            version,
            False,
            f"criu {version} is too old: CRIU 3 cannot dump on kernels 6.13 and newer; "
            "install CRIU 4 with scripts/install-criu.sh",
        )
    try:
        check_run = subprocess.run(
            [path, "check"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return CriuStatus(path, version, False, f"cannot run {path} check: {error}")
    if check_run.returncode != 0:
        output = (check_run.stdout + check_run.stderr).strip().splitlines()
        return CriuStatus(
            path, version, False, f"criu check failed: {' | '.join(output[-_LOG_TAIL_LINES:])}"
        )
    return CriuStatus(path, version, True, f"criu {version} at {path}: criu check passed")


def check_configured_criu() -> CriuStatus:
    """Check the criu binary that VMFLOW_GATEWAY_CRIU names, else the one `find_criu` finds.

    The gateway reads the same variable into `GatewaySettings.criu`.
    """
    return check_criu(find_criu(os.environ.get("VMFLOW_GATEWAY_CRIU")))


def log_tail(log_path: Path) -> str:
    """Return CRIU's error lines from a log, else its last lines, joined for a message."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no CRIU log"
    errors = [line for line in lines if "Error" in line or "error" in line]
    chosen = (errors or lines)[-_LOG_TAIL_LINES:]
    return " | ".join(line.strip() for line in chosen)


async def run_criu(
    criu: str, action: str, arguments: list[str], *, log_path: Path, timeout_s: float
) -> None:
    """Run `criu <action> …` with its log at `log_path`; raise `CriuError` when it fails."""
    command = [criu, action, "-o", str(log_path), "-v4", *arguments]
    logger.debug("running %s", " ".join(command))
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise CriuError(
            f"criu {action} timed out after {timeout_s} s; see {log_path}",
            log_path=str(log_path),
        ) from None
    if process.returncode != 0:
        printed = output.decode(errors="replace").strip()
        raise CriuError(
            f"criu {action} failed with exit code {process.returncode}: {log_tail(log_path)}"
            + (f" ({printed[-300:]})" if printed else "")
            + f"; full log at {log_path}",
            log_path=str(log_path),
        )
