# Reads of /proc and of small local state files are treated as non-blocking.
# ruff: noqa: ASYNC240, ASYNC110
"""The sandbox driver: the image's runtime in new pid, mount, net, ipc and uts namespaces.

The sandbox's root is an empty directory, bind-mounted onto itself and made the root with
`pivot_root`, then remounted read-only; the old root is unmounted and its mount point
removed. There is no /tmp, because TMPDIR points to /scratch. Read-only binds bring in
the host's /usr, the Python that runs the gateway, a generated /etc and the image at /app.
A few /dev nodes and /proc complete it, with a private writable /scratch.
/run/vmflow, the instance's io directory, is read-only and contains the channel socket.
Its two files, output.log and exit_status, are bound writable onto themselves. So the
process can write them but cannot replace them with a symlink that the gateway would
follow on the host.
The process keeps uid 0 but has no capabilities (an empty bounding set and no_new_privs),
so it cannot remount any of it or write to the host files mounted into it.
Limits are cgroup v1 memory, pids and cpu directories; there is no network interface
other than a loopback that is down.

Snapshots are CRIU dumps of the namespace's whole process tree. Every bind mount is
passed to CRIU as an external mount, so a restore can bind the new instance's own
scratch and /run/vmflow in their place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import vmflow
from vmflow.compute.models import DriverCapabilities
from vmflow.gateway.drivers.base import CheckpointResult, LaunchSpec, Runtime
from vmflow.gateway.drivers.cgroups import CgroupSet
from vmflow.gateway.drivers.criu import check_criu, find_criu, log_tail, run_criu
from vmflow.gateway.errors import CriuError, SandboxError, SnapshotsUnavailableError
from vmflow.gateway.hostfiles import copy_regular, read_regular
from vmflow.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

# NOTE: the sandboxed process keeps uid 0 because CRIU must read its rlimits with prlimit(),
# which for another uid needs CAP_SYS_RESOURCE, and some hosts run root without it. It has
# no capabilities, and the mounts, not file ownership, keep it from writing host files.
SANDBOX_UID = 0
CHANNEL_PATH = "/run/vmflow/channel.sock"
OUTPUT_PATH = "/run/vmflow/output.log"
EXIT_STATUS_PATH = "/run/vmflow/exit_status"
IO_FILES = ("output.log", "exit_status")
DEV_NODES = ("null", "zero", "full", "random", "urandom")
# The version of the mount layout that `checkpoint` writes to sandbox.json. Version 1
# snapshots bind /run/vmflow writable, so a restore of one would bring that back.
LAYOUT_VERSION = 2
# Written last into a snapshot's directory: every file a restore needs is in place.
COMPLETE_MARKER = "complete.json"
# The line CRIU 4 logs after a dump that stopped the dumped tree.
DUMP_FINISHED = "Dumping finished successfully"
START_TIMEOUT_S = 30.0
CRIU_TIMEOUT_S = 300.0
# Variables every sandboxed process gets; the request's env is applied over them.
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/scratch",
    "TMPDIR": "/scratch",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONPATH": "/app",
    "VMFLOW_CHANNEL": CHANNEL_PATH,
}


@dataclass(frozen=True)
class Bind:
    """A bind mount: host `source` at `target` inside the sandbox; `key` names it for CRIU."""

    source: Path
    target: str
    read_only: bool = True
    is_file: bool = False

    @property
    def key(self) -> str:
        return "vmflow" + re.sub(r"[^A-Za-z0-9]", "_", self.target)


def _host_python_paths() -> list[Path]:
    """Return the directories the gateway's Python and vmflow are imported from."""
    source_root = Path(vmflow.__file__).resolve().parents[1]
    candidates = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), source_root}
    candidates.add(Path(sys.executable).resolve().parents[1])
    chosen: list[Path] = []
    for path in sorted(candidates, key=lambda p: len(p.parts)):
        if path.is_relative_to("/usr") or any(path.is_relative_to(p) for p in chosen):
            continue
        chosen.append(path)
    return chosen


class SandboxDriver:
    """Runs each instance in its own namespaces and cgroups; snapshots it with CRIU."""

    name = "sandbox"

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.criu = check_criu(find_criu(settings.criu))
        self.unavailable = self._check_host()
        self._etc_dir = settings.state_dir / "sandbox" / "etc"
        self._launchers: dict[int, asyncio.subprocess.Process] = {}
        self._host_binds, self._symlinks = self._plan_host_binds()
        if self.unavailable is None:
            self._write_etc()
            self._warn_if_state_is_visible()
        if self.criu.works:
            logger.info("sandbox driver: %s", self.criu.detail)
        else:
            logger.warning("sandbox driver: snapshots unavailable: %s", self.criu.detail)

    # Capabilities

    def _check_host(self) -> str | None:
        if os.geteuid() != 0:
            return "the sandbox driver needs root (namespaces, cgroups, bind mounts)"
        missing = [
            tool
            for tool in ("unshare", "pivot_root", "setpriv", "setsid", "mount")
            if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None
        ]
        if missing:
            return f"missing tools {', '.join(missing)}; install util-linux and mount"
        return CgroupSet.available()

    def capabilities(self) -> DriverCapabilities:
        available = self.unavailable is None
        detail = self.unavailable if not available else self.criu.detail
        return DriverCapabilities(
            name=self.name,
            available=available,
            snapshots=available and self.criu.works,
            detail=detail,
            criu_version=self.criu.version,
        )

    def require_snapshots(self) -> str:
        """Return the criu path, or raise `SnapshotsUnavailableError` saying why there is none."""
        if self.unavailable is not None:
            raise SnapshotsUnavailableError(f"sandbox driver unavailable: {self.unavailable}")
        if not self.criu.works or self.criu.path is None:
            raise SnapshotsUnavailableError(f"snapshots unavailable: {self.criu.detail}")
        return self.criu.path

    # Paths

    def channel_socket(self, instance_dir: Path) -> Path:
        return instance_dir / "io" / "channel.sock"

    def output_path(self, instance_dir: Path) -> Path:
        # NOTE: the output log is not rotated or capped; it grows with what the runtime prints.
        return instance_dir / "io" / "output.log"

    # Layout

    def _plan_host_binds(self) -> tuple[list[Bind], dict[str, str]]:
        binds = [Bind(Path("/usr"), "/usr")]
        symlinks: dict[str, str] = {}
        # Debian's merged /usr makes these symlinks; older layouts have real directories.
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/") / top
            if host.is_symlink():
                symlinks[f"/{top}"] = os.readlink(host)
            elif host.is_dir():
                binds.append(Bind(host, f"/{top}"))
        for path in _host_python_paths():
            binds.append(Bind(path, str(path)))
        for node in DEV_NODES:
            binds.append(Bind(Path("/dev") / node, f"/dev/{node}", read_only=False, is_file=True))
        return binds, symlinks

    def _warn_if_state_is_visible(self) -> None:
        state_dir = self.settings.state_dir.resolve()
        for bind in self._host_binds:
            if state_dir.is_relative_to(bind.source):
                logger.warning(
                    "the state directory %s is inside %s, which every sandbox sees read-only, "
                    "so instances can read each other's scratch files and workload tokens; "
                    "set VMFLOW_GATEWAY_STATE_DIR outside it",
                    state_dir,
                    bind.source,
                )

    def _write_etc(self) -> None:
        """Write the sandbox's /etc: accounts, hosts and the loader cache, and no secrets."""
        etc = self._etc_dir
        etc.mkdir(parents=True, exist_ok=True)
        files = {
            "passwd": "root:x:0:0:root:/scratch:/usr/sbin/nologin\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            "group": "root:x:0:\nnogroup:x:65534:\n",
            "hosts": "127.0.0.1 localhost\n::1 localhost\n",
            "hostname": "sandbox\n",
            "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
            "resolv.conf": "",
        }
        for name, text in files.items():
            (etc / name).write_text(text)
        if Path("/etc/ld.so.cache").is_file():
            shutil.copyfile("/etc/ld.so.cache", etc / "ld.so.cache")

    def _binds(self, spec: LaunchSpec) -> list[Bind]:
        io = spec.instance_dir / "io"
        return [
            *self._host_binds,
            Bind(self._etc_dir, "/etc"),
            Bind(spec.image.app_dir, "/app"),
            Bind(spec.instance_dir / "scratch", "/scratch", read_only=False),
            # The directory comes before the files bound onto its entries.
            Bind(io, "/run/vmflow"),
            *(
                Bind(io / name, f"/run/vmflow/{name}", read_only=False, is_file=True)
                for name in IO_FILES
            ),
        ]

    def _prepare_dirs(self, spec: LaunchSpec, binds: list[Bind]) -> Path:
        """Create the empty root with a mount point for every bind, plus scratch and io."""
        for name in ("scratch", "io"):
            path = spec.instance_dir / name
            path.mkdir(exist_ok=True)
            os.chown(path, SANDBOX_UID, SANDBOX_UID)
        for name in IO_FILES:
            # The files must exist as bind sources; O_NOFOLLOW rejects a planted symlink.
            fd = os.open(
                spec.instance_dir / "io" / name,
                os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
            )
            os.close(fd)
        root = spec.instance_dir / "root"
        root.mkdir(parents=True, exist_ok=True)
        for name in ("proc", ".oldroot"):
            (root / name).mkdir(exist_ok=True)
        for link, target in self._symlinks.items():
            with contextlib.suppress(FileExistsError):
                (root / link.lstrip("/")).symlink_to(target)
        for bind in binds:
            mount_point = root / bind.target.lstrip("/")
            if bind.is_file:
                mount_point.parent.mkdir(parents=True, exist_ok=True)
                mount_point.touch(exist_ok=True)
            else:
                mount_point.mkdir(parents=True, exist_ok=True)
        return root

    def _command(self, spec: LaunchSpec) -> list[str]:
        command = list(spec.image.manifest.command or ["python", "-m", "vmflow.runner.agent"])
        if command[0] in ("python", "python3"):
            command[0] = sys.executable
        return command

    def _process_env(self, spec: LaunchSpec) -> dict[str, str]:
        env = dict(BASE_ENV)
        env["VMFLOW_TASK_MODULES"] = ",".join(spec.image.manifest.tasks)
        env.update(spec.env)
        # The channel's path is fixed by the sandbox layout, so a request cannot move it.
        env["VMFLOW_CHANNEL"] = CHANNEL_PATH
        return env

    def _init_script(self, root: Path, binds: list[Bind], command: list[str]) -> str:
        """Return the shell script that PID 1 of the new namespaces runs before the runtime."""
        quoted_root = shlex.quote(str(root))
        lines = ["set -eu", f"mount --bind {quoted_root} {quoted_root}"]
        for bind in binds:
            target = shlex.quote(str(root) + bind.target)
            lines.append(f"mount --bind {shlex.quote(str(bind.source))} {target}")
            flags = "remount,bind,nosuid" + (",ro,nodev" if bind.read_only else "")
            if not bind.is_file:
                lines.append(f"mount -o {flags} {target}")
        lines += [
            f"mount -t proc -o nosuid,nodev,noexec proc {quoted_root}/proc",
            f"cd {quoted_root}",
            "pivot_root . .oldroot",
            "umount -l /.oldroot",
            "rmdir /.oldroot",
            "mount -o remount,bind,ro,nosuid,nodev /",
            # set -e stops at a failed mount, and this stops at a remount without effect.
            "if touch /.vmflow-write-check 2>/dev/null; then"
            " echo 'vmflow-sandbox: / is still writable after the read-only remount' >&2;"
            " exit 1; fi",
            "hostname sandbox",
            f"exec </dev/null >>{OUTPUT_PATH} 2>&1",
            "cd /app",
            # PID 1 stays a shell that records the runtime's exit status, so the gateway
            # learns it even after a restore or its own restart. setsid: CRIU needs the
            # session leader inside the pid namespace.
            "exec setsid setpriv"
            f" --reuid={SANDBOX_UID} --regid={SANDBOX_UID} --clear-groups"
            " --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs --"
            f" /bin/sh -c '\"$@\"; echo $? > {EXIT_STATUS_PATH}' vmflow-init "
            + " ".join(shlex.quote(part) for part in command),
        ]
        return "\n".join(lines) + "\n"

    # Lifecycle

    async def start(self, spec: LaunchSpec) -> Runtime:
        if self.unavailable is not None:
            raise SandboxError(f"sandbox driver unavailable: {self.unavailable}")
        started = time.perf_counter()
        binds = self._binds(spec)
        root = self._prepare_dirs(spec, binds)
        cgroups = self._create_cgroups(spec)
        script = self._init_script(root, binds, self._command(spec))
        prepared = time.perf_counter()
        (spec.instance_dir / "init.sh").write_text(script)

        unshare = "exec unshare --fork --pid --mount --net --ipc --uts --propagation private"
        launcher = await self._spawn_in_cgroups(
            cgroups, f'{unshare} /bin/sh -c "$1"', [script], spec, self._process_env(spec)
        )
        try:
            pid = await self._wait_for_child(launcher, spec)
        except BaseException:
            await self._abort(launcher, cgroups)
            raise
        logger.info("sandbox %s started: pid %d", spec.instance_id, pid)
        runtime = self._runtime(pid, launcher, spec, mode="cold")
        runtime.timing = {
            "prepare_ms": _ms(started, prepared),
            "namespaces_ms": _ms(prepared, time.perf_counter()),
        }
        return runtime

    async def restore(self, spec: LaunchSpec, snapshot_dir: Path) -> Runtime:
        criu = self.require_snapshots()
        meta = json.loads((snapshot_dir / "sandbox.json").read_text())
        if meta.get("layout", 1) < LAYOUT_VERSION:
            raise SandboxError(
                f"snapshot {snapshot_dir.name} was taken by an older gateway that let the "
                "sandbox replace files in /run/vmflow, so it is not restored; take a new one"
            )
        binds = self._binds(spec)
        by_target = {bind.target: bind for bind in binds}
        missing = [target for target in meta["mounts"].values() if target not in by_target]
        if missing:
            raise SandboxError(
                f"snapshot {snapshot_dir.name} needs mounts {missing} that this gateway "
                "does not provide; restore it on the gateway that took it"
            )
        started = time.perf_counter()
        root = self._prepare_dirs(spec, binds)
        await _copy_tree(snapshot_dir / "files" / "scratch", spec.instance_dir / "scratch")
        await _copy_tree(snapshot_dir / "files" / "io", spec.instance_dir / "io")
        cgroups = self._create_cgroups(spec)
        prepared = time.perf_counter()

        pidfile = spec.instance_dir / "restore.pid"
        log_path = spec.instance_dir / "restore.log"
        arguments = [
            "restore",
            "-D", str(snapshot_dir / "images"),
            "-o", str(log_path),
            "-v4",
            "--root", str(root),
            "--network-lock", "skip",
            "--manage-cgroups=ignore",
            "--pidfile", str(pidfile),
            # criu exits once the tree runs, so it does not stay in the instance's cgroups.
            "--restore-detached",
            # The tree stays stopped until the root is read-only again; see _seal_root.
            "--leave-stopped",
        ]  # fmt: skip
        for key, target in meta["mounts"].items():
            arguments += ["--external", f"mnt[{key}]:{by_target[target].source}"]
        quoted = " ".join(shlex.quote(part) for part in [criu, *arguments])
        launcher = await self._spawn_in_cgroups(cgroups, f"exec {quoted}", [], spec, {})
        try:
            pid = await self._wait_for_pidfile(launcher, pidfile, log_path, spec)
            await _seal_root(pid, spec)
            _continue_tree(cgroups)
        except BaseException:
            await self._abort(launcher, cgroups)
            raise
        logger.info("sandbox %s restored from %s: pid %d", spec.instance_id, snapshot_dir, pid)
        runtime = self._runtime(pid, launcher, spec, mode="restore")
        runtime.timing = {
            "prepare_ms": _ms(started, prepared),
            "criu_restore_ms": _ms(prepared, time.perf_counter()),
        }
        return runtime

    async def checkpoint(
        self, runtime: Runtime, spec: LaunchSpec, snapshot_dir: Path
    ) -> CheckpointResult:
        criu = self.require_snapshots()
        if not self.is_alive(runtime):
            raise SandboxError(f"instance {spec.instance_id} is not running; nothing to snapshot")
        images = snapshot_dir / "images"
        images.mkdir(parents=True, exist_ok=True)
        binds = self._binds(spec)
        arguments = [
            "-t", str(runtime.pid),
            "-D", str(images),
            "--network-lock", "skip",
            "--manage-cgroups=ignore",
            "--file-locks",
        ]  # fmt: skip
        for bind in binds:
            arguments += ["--external", f"mnt[{bind.target}]:{bind.key}"]

        started = time.perf_counter()
        await run_criu(
            criu, "dump", arguments, log_path=snapshot_dir / "dump.log", timeout_s=CRIU_TIMEOUT_S
        )
        dumped = time.perf_counter()
        await self._store_files(spec, snapshot_dir, runtime.pid)
        copied = time.perf_counter()

        await self.stop(runtime, spec.instance_id)
        timing = {"criu_dump_ms": _ms(started, dumped), "copy_ms": _ms(dumped, copied)}
        return _mark_complete(snapshot_dir, timing)

    async def recover_checkpoint(
        self, runtime: Runtime | None, spec: LaunchSpec, snapshot_dir: Path
    ) -> CheckpointResult | None:
        """Finish a checkpoint that a gateway crash interrupted, if its dump completed.

        Returns None when the snapshot cannot be used: the dump did not finish, the
        instance still runs, or its files are gone.
        """
        marker = snapshot_dir / COMPLETE_MARKER
        with contextlib.suppress(FileNotFoundError):
            saved = json.loads(read_regular(marker))
            return CheckpointResult(size_bytes=saved["size_bytes"], timing=saved["timing"])
        try:
            dump_log = read_regular(snapshot_dir / "dump.log").decode(errors="replace")
        except OSError:
            return None
        if DUMP_FINISHED not in dump_log:
            return None
        if runtime is not None and self.is_alive(runtime):
            return None
        if not (spec.instance_dir / "scratch").is_dir():
            return None
        await self.stop(runtime, spec.instance_id)
        started = time.perf_counter()
        pid = runtime.pid if runtime is not None else 0
        await self._store_files(spec, snapshot_dir, pid)
        return _mark_complete(snapshot_dir, {"copy_ms": _ms(started, time.perf_counter())})

    async def _store_files(self, spec: LaunchSpec, snapshot_dir: Path, pid: int) -> None:
        """Copy the instance's scratch and io files next to the images, and the mount layout."""
        binds = self._binds(spec)
        # The dump killed the tree, so the files are final: they go with the images, because
        # CRIU requires every open file to have the same size at restore as at dump.
        files = snapshot_dir / "files"
        files.mkdir(exist_ok=True)
        await _copy_tree(spec.instance_dir / "scratch", files / "scratch")
        io_copy = files / "io"
        io_copy.mkdir(exist_ok=True)
        for name in IO_FILES:
            copy_regular(spec.instance_dir / "io" / name, io_copy / name)
            os.chown(io_copy / name, SANDBOX_UID, SANDBOX_UID)
        meta = {
            "layout": LAYOUT_VERSION,
            "mounts": {bind.key: bind.target for bind in binds},
            "pid": pid,
        }
        (snapshot_dir / "sandbox.json").write_text(json.dumps(meta, indent=2))

    async def stop(self, runtime: Runtime | None, instance_id: str) -> None:
        cgroups = CgroupSet(self.settings.cgroup_parent, instance_id)
        if runtime is not None and self.is_alive(runtime):
            # SIGKILL to PID 1 of a pid namespace kills every process in it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(runtime.pid, signal.SIGKILL)
        # Stray tasks, such as a launcher whose child is gone, are killed by cgroup membership.
        deadline = time.monotonic() + 10
        while (pids := cgroups.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.02)
        if runtime is not None:
            launcher = self._launchers.pop(int(runtime.details.get("launcher_pid", "-1")), None)
            if launcher is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(launcher.wait(), 5)
        await asyncio.to_thread(cgroups.remove)

    def release_shared(self) -> None:
        CgroupSet.remove_parent(self.settings.cgroup_parent)

    def is_alive(self, runtime: Runtime) -> bool:
        start_time = _start_time(runtime.pid)
        return start_time is not None and start_time == runtime.start_time

    async def wait(self, runtime: Runtime) -> None:
        while self.is_alive(runtime):
            await asyncio.sleep(0.1)
        launcher = self._launchers.pop(int(runtime.details.get("launcher_pid", "-1")), None)
        if launcher is not None:
            await launcher.wait()

    def exit_code(self, runtime: Runtime) -> int | None:
        """Return the exit status PID 1 recorded (128 + signal for a killed runtime)."""
        path = Path(runtime.details.get("instance_dir", "/nonexistent")) / "io" / "exit_status"
        try:
            return int(read_regular(path, tail_bytes=64).strip())
        except (OSError, ValueError):
            return None

    # Helpers

    def _create_cgroups(self, spec: LaunchSpec) -> CgroupSet:
        cgroups = CgroupSet(self.settings.cgroup_parent, spec.instance_id)
        cgroups.create(
            cpu=spec.cpu,
            memory_bytes=int(spec.memory_gb * 1024**3),
            pids_max=self.settings.pids_max,
        )
        return cgroups

    async def _spawn_in_cgroups(
        self,
        cgroups: CgroupSet,
        command: str,
        arguments: list[str],
        spec: LaunchSpec,
        env: dict[str, str],
    ) -> asyncio.subprocess.Process:
        """Start `sh -c` that joins the cgroups, then execs `command`, so no task escapes them."""
        join = " && ".join(f"echo $$ > {shlex.quote(str(path))}" for path in cgroups.procs_files())
        launch_log = (spec.instance_dir / "launch.log").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                f"{join} && {command}",
                "vmflow-sandbox",
                *arguments,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=launch_log,
                stderr=launch_log,
                env={**env, "PATH": env.get("PATH", BASE_ENV["PATH"]) + ":/usr/sbin:/sbin"},
                start_new_session=True,
            )
        except OSError as error:
            cgroups.remove()
            raise SandboxError(f"cannot start sandbox {spec.instance_id}: {error}") from error
        finally:
            launch_log.close()
        self._launchers[process.pid] = process
        return process

    async def _wait_for_child(self, launcher: asyncio.subprocess.Process, spec: LaunchSpec) -> int:
        """Return PID 1 of the new namespaces once its stdout is the output log (setup done)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        children_file = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
        while time.monotonic() < deadline:
            if launcher.returncode is not None:
                raise SandboxError(
                    f"sandbox {spec.instance_id} exited during setup with code "
                    f"{launcher.returncode}: {_read_tail(spec.instance_dir / 'launch.log')}"
                )
            with contextlib.suppress(OSError, ValueError, IndexError):
                child = int(children_file.read_text().split()[0])
                # readlink returns the path inside the child's mount namespace.
                if os.readlink(f"/proc/{child}/fd/1") == OUTPUT_PATH:
                    return child
            await asyncio.sleep(0.005)
        raise SandboxError(
            f"sandbox {spec.instance_id} did not finish setup in {START_TIMEOUT_S} s"
        )

    async def _wait_for_pidfile(
        self,
        launcher: asyncio.subprocess.Process,
        pidfile: Path,
        log_path: Path,
        spec: LaunchSpec,
    ) -> int:
        """Wait for `criu restore --restore-detached` to exit; return the restored PID 1."""
        try:
            code = await asyncio.wait_for(launcher.wait(), CRIU_TIMEOUT_S)
        except TimeoutError:
            raise CriuError(
                f"criu restore of instance {spec.instance_id} timed out after "
                f"{CRIU_TIMEOUT_S} s; see {log_path}",
                log_path=str(log_path),
            ) from None
        self._launchers.pop(launcher.pid, None)
        if code != 0:
            raise CriuError(
                f"criu restore of instance {spec.instance_id} failed with exit code "
                f"{code}: {log_tail(log_path)}; full log at {log_path}",
                log_path=str(log_path),
            )
        try:
            return int(pidfile.read_text())
        except (OSError, ValueError) as error:
            raise CriuError(
                f"criu restore of instance {spec.instance_id} wrote no pid file: {error}",
                log_path=str(log_path),
            ) from error

    async def _abort(self, launcher: asyncio.subprocess.Process, cgroups: CgroupSet) -> None:
        with contextlib.suppress(ProcessLookupError):
            launcher.kill()
        for pid in cgroups.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(launcher.wait(), 5)
        self._launchers.pop(launcher.pid, None)
        await asyncio.to_thread(cgroups.remove)

    def _runtime(
        self, pid: int, launcher: asyncio.subprocess.Process, spec: LaunchSpec, *, mode: str
    ) -> Runtime:
        start_time = _start_time(pid)
        if start_time is None:
            raise SandboxError(f"sandbox process {pid} exited right after it started")
        return Runtime(
            pid=pid,
            start_time=start_time,
            driver=self.name,
            details={
                "launcher_pid": str(launcher.pid),
                "mode": mode,
                "instance_dir": str(spec.instance_dir),
            },
        )


async def _seal_root(pid: int, spec: LaunchSpec) -> None:
    """Remount a restored sandbox's root read-only while its tree is still stopped.

    criu 4.1 restores the root mount from `--root` writable, whatever flags the
    dump recorded, so the read-only remount of a cold start is repeated here.
    """
    process = await asyncio.create_subprocess_exec(
        "nsenter", f"--target={pid}", "--mount", "--",
        "mount", "-o", "remount,bind,ro,nosuid,nodev", "/",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, error = await process.communicate()
    if process.returncode != 0:
        raise SandboxError(
            f"cannot make the root of restored instance {spec.instance_id} read-only: "
            f"{error.decode(errors='replace').strip()}"
        )
    if not _root_is_read_only(pid):
        raise SandboxError(
            f"the root of restored instance {spec.instance_id} is still writable after "
            "the read-only remount"
        )


def _root_is_read_only(pid: int) -> bool:
    """Return whether the mount at `/` of the process's mount namespace is read-only."""
    options = None
    # mountinfo lists stacked mounts in mount order, so the last one at `/` is visible.
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            options = fields[5].split(",")
    return options is not None and "ro" in options


def _continue_tree(cgroups: CgroupSet) -> None:
    """Resume every process of a tree that criu restored stopped."""
    for pid in cgroups.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)


def _start_time(pid: int) -> int | None:
    """Return a process's start time in clock ticks, None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _read_tail(path: Path, limit: int = 600) -> str:
    try:
        return read_regular(path, tail_bytes=limit).decode(errors="replace").strip() or "no output"
    except OSError:
        return "no output"


async def _copy_tree(source: Path, destination: Path) -> None:
    """Copy a directory with ownership, modes and sparse files (`cp -a`); skip sockets."""
    destination.mkdir(parents=True, exist_ok=True)
    if not source.is_dir():
        return
    entries = [str(entry) for entry in source.iterdir() if not stat.S_ISSOCK(entry.lstat().st_mode)]
    if not entries:
        return
    process = await asyncio.create_subprocess_exec(
        "cp", "-a", "--reflink=auto", *entries, str(destination),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, error = await process.communicate()
    if process.returncode != 0:
        raise SandboxError(f"cannot copy {source} to {destination}: {error.decode().strip()}")


def _mark_complete(snapshot_dir: Path, timing: dict[str, float]) -> CheckpointResult:
    """Write the snapshot's completion marker atomically and return its result."""
    result = CheckpointResult(size_bytes=_tree_size(snapshot_dir), timing=timing)
    marker = snapshot_dir / COMPLETE_MARKER
    temporary = marker.with_suffix(".tmp")
    temporary.write_text(json.dumps({"size_bytes": result.size_bytes, "timing": timing}))
    os.replace(temporary, marker)
    return result


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total
