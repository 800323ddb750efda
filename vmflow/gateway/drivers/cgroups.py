"""cgroup v1 limits for sandboxes: memory, pids and cpu directories under one parent.

NOTE: this host has the hybrid layout, where the v1 controllers carry the limits and the
cgroup2 hierarchy at /sys/fs/cgroup/unified has none of them.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

from vmflow.gateway.errors import SandboxError

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu")
CFS_PERIOD_US = 100_000


class CgroupSet:
    """One instance's directories in the memory, pids and cpu hierarchies.

    Gateways on one host may share a parent: each removes only the directories named by
    its own instance ids, which are random, and rmdir leaves a parent that is not empty.
    """

    def __init__(self, parent: str, instance_id: str, root: Path = CGROUP_ROOT) -> None:
        self.paths = {name: root / name / parent / instance_id for name in CONTROLLERS}
        self.instance_id = instance_id

    @staticmethod
    def available(root: Path = CGROUP_ROOT) -> str | None:
        """Return why cgroup v1 limits cannot be used here, or None when they can."""
        for name in CONTROLLERS:
            if not (root / name / "cgroup.procs").is_file():
                return f"cgroup v1 controller {name!r} is not mounted at {root / name}"
        return None

    def create(self, *, cpu: float, memory_bytes: int, pids_max: int) -> None:
        """Create the directories and write the limits; on failure remove what was created."""
        try:
            for path in self.paths.values():
                path.mkdir(parents=True, exist_ok=True)
            memory = self.paths["memory"]
            self._write(memory / "memory.limit_in_bytes", str(memory_bytes))
            # Swap would let the instance exceed its memory limit unnoticed.
            if (memory / "memory.memsw.limit_in_bytes").exists():
                self._write(memory / "memory.memsw.limit_in_bytes", str(memory_bytes))
            self._write(memory / "memory.swappiness", "0", required=False)
            self._write(self.paths["pids"] / "pids.max", str(pids_max))
            cpu_dir = self.paths["cpu"]
            self._write(cpu_dir / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            self._write(cpu_dir / "cpu.cfs_quota_us", str(max(1000, int(cpu * CFS_PERIOD_US))))
        except SandboxError:
            self.remove()
            raise
        except OSError as error:
            self.remove()
            raise SandboxError(
                f"cannot create cgroups for instance {self.instance_id}: {error}"
            ) from error

    @staticmethod
    def remove_parent(parent: str, root: Path = CGROUP_ROOT) -> None:
        """Remove the parent directories; a parent that still has instances stays."""
        for name in CONTROLLERS:
            try:
                (root / name / parent).rmdir()
            except FileNotFoundError:
                continue
            except OSError as error:
                logger.debug("cgroup parent %s/%s stays: %s", name, parent, error)

    def procs_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in self.paths.values()]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths.values():
            try:
                found.update(int(line) for line in (path / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                continue
        return found

    def read(self, controller: str, name: str) -> str | None:
        try:
            return (self.paths[controller] / name).read_text().strip()
        except OSError:
            return None

    def remove(self, timeout_s: float = 5.0) -> None:
        """Remove the directories, waiting a bounded time for exiting tasks to leave them."""
        deadline = time.monotonic() + timeout_s
        for path in self.paths.values():
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as error:
                    # EBUSY: killed tasks are still being torn down by the kernel.
                    if error.errno != errno.EBUSY or time.monotonic() > deadline:
                        logger.warning(
                            "cannot remove cgroup %s of instance %s: %s",
                            path,
                            self.instance_id,
                            error,
                        )
                        break
                    time.sleep(0.01)

    @staticmethod
    def _write(path: Path, value: str, *, required: bool = True) -> None:
        try:
            path.write_text(value)
        except OSError as error:
            if required:
                raise SandboxError(f"cannot write {value} to {path}: {error}") from error
