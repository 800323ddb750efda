"""The floor under a sandbox restore: a plain `criu restore` of a comparable process image.

The process is this interpreter after importing the runner agent, the same
code a sandboxed runner has loaded, but with no namespaces, no cgroups, no
bind mounts and no gateway. It is dumped once; each repetition restores it
detached, times the `criu restore` command from spawn to exit, and kills
the restored process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmflow.gateway.drivers.criu import check_configured_criu

# Imports what a runner has loaded, then sleeps until killed.
COMPARABLE_PROGRAM = (
    "import signal, vmflow.runner.agent; print('ready', flush=True); signal.pause()"
)
CRIU_TIMEOUT_S = 120.0
GONE_TIMEOUT_S = 10.0


@dataclass
class CriuFloorResult:
    restores_s: list[float] = field(default_factory=list)
    image_bytes: int = 0
    criu: str = ""


class CriuUnavailableError(RuntimeError):
    """CRIU 4 is missing or `criu check` fails here."""


def _wait_gone(pid: int) -> None:
    """Wait until `pid` has left /proc, so the next restore can take the same pid."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"process {pid} was killed but still exists after {GONE_TIMEOUT_S} s"
            )
        time.sleep(0.005)


def _run_criu(command: list[str], log_path: Path) -> None:
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=CRIU_TIMEOUT_S, check=False
    )
    if completed.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-8:] if log_path.exists() else []
        raise RuntimeError(
            f"{' '.join(command[:2])} failed with exit code {completed.returncode}: "
            + " | ".join(tail)
        )


def measure(repeats: int) -> CriuFloorResult:
    """Dump the comparable process once and time `repeats` restores of it (after one warm-up)."""
    status = check_configured_criu()
    if not status.works or status.path is None:
        raise CriuUnavailableError(status.detail)
    criu = status.path
    result = CriuFloorResult(criu=status.detail)

    workdir = Path(tempfile.mkdtemp(prefix="vmflow-bench-criu-"))
    images = workdir / "images"
    images.mkdir()
    try:
        # A session of its own and /dev/null for every stream: CRIU dumps a tree whose
        # session leader it contains and whose files it can reopen at restore.
        process = subprocess.Popen(
            [sys.executable, "-c", COMPARABLE_PROGRAM],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            process.kill()
            raise RuntimeError("the comparable process exited before it was ready")
        # The pipe would be an open file in the image that CRIU cannot reopen at restore.
        process.stdout.close()
        # NOTE: the pipe's other end is closed now, so the program must not print again.
        dump_log = workdir / "dump.log"
        try:
            _run_criu(
                [criu, "dump", "-t", str(process.pid), "-D", str(images), "-o", str(dump_log),
                 "--network-lock", "skip", "--ext-unix-sk"],
                dump_log,
            )  # fmt: skip
        except BaseException:
            process.kill()
            raise
        process.wait(timeout=GONE_TIMEOUT_S)
        result.image_bytes = sum(path.stat().st_size for path in images.iterdir())

        for attempt in range(repeats + 1):
            pidfile = workdir / f"restore-{attempt}.pid"
            restore_log = workdir / f"restore-{attempt}.log"
            started = time.perf_counter()
            _run_criu(
                [criu, "restore", "-D", str(images), "-d", "--pidfile", str(pidfile),
                 "-o", str(restore_log), "--network-lock", "skip", "--ext-unix-sk"],
                restore_log,
            )  # fmt: skip
            elapsed = time.perf_counter() - started
            pid = int(pidfile.read_text())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
            if attempt > 0:
                result.restores_s.append(elapsed)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result
