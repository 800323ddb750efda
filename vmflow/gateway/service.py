"""The gateway's operations on instances, snapshots and templates, independent of HTTP.

`Gateway` keeps the records, serializes work per instance name, runs each instance's
channel server, and hands processes to a driver. Background work (snapshots, background
template builds) runs as tasks that end in a signed callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vmflow.compute.images import InvalidImageReferenceError, strip_image_digest
from vmflow.compute.models import (
    CallbackStatus,
    CallbackTarget,
    Health,
    Instance,
    InstanceCreateRequest,
    InstanceCreateResponse,
    InstanceState,
    Snapshot,
    SnapshotCallback,
    SnapshotRestoreRequest,
    SnapshotRestoreResponse,
    SnapshotState,
    TemplateCallback,
    TemplateCreateRequest,
    TemplateCreateResponse,
)
from vmflow.gateway.callbacks import CallbackSender
from vmflow.gateway.channel import ChannelServer
from vmflow.gateway.drivers.base import Driver, LaunchSpec, Runtime
from vmflow.gateway.errors import (
    ConflictError,
    GatewayError,
    ImageError,
    InvalidRequestError,
    NotFoundError,
    SandboxError,
    SnapshotsUnavailableError,
)
from vmflow.gateway.hostfiles import NotRegularFileError, read_regular
from vmflow.gateway.images import Image, ImageStore
from vmflow.gateway.settings import GatewaySettings
from vmflow.gateway.state import (
    InstanceRecord,
    RecordStore,
    SnapshotRecord,
    TemplateRecord,
    TemplateState,
    new_id,
)

logger = logging.getLogger(__name__)

# Consumed by the gateway for the channel's proxy and removed from the process's env.
WORKLOAD_URL_VAR = "VMFLOW_WORKLOAD_URL"
WORKLOAD_TOKEN_VAR = "VMFLOW_WORKLOAD_TOKEN"
_LIVE_STATES = (InstanceState.STARTING, InstanceState.RUNNING, InstanceState.SNAPSHOTTING)


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


class Gateway:
    """Instances, snapshots and templates of one gateway, on one driver."""

    def __init__(
        self,
        settings: GatewaySettings,
        driver: Driver,
        callbacks: CallbackSender,
    ) -> None:
        self.settings = settings
        self.driver = driver
        self.callbacks = callbacks
        self.images = ImageStore(settings.image_dir)
        state_dir = settings.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        self._instance_store = RecordStore(state_dir / "records" / "instances", InstanceRecord)
        self._snapshot_store = RecordStore(state_dir / "records" / "snapshots", SnapshotRecord)
        self._template_store = RecordStore(state_dir / "records" / "templates", TemplateRecord)
        self.instances: dict[str, InstanceRecord] = {}
        self.snapshots: dict[str, SnapshotRecord] = {}
        self.templates: dict[str, TemplateRecord] = {}
        self._channels: dict[str, ChannelServer] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Snapshots and template builds, which `close()` lets finish.
        self._work: set[asyncio.Task[Any]] = set()

    # Start and stop

    async def start(self) -> None:
        """Load the records and reconcile them with the processes that still run."""
        self.instances = {r.id: r for r in self._instance_store.load_all()}
        self.snapshots = {r.id: r for r in self._snapshot_store.load_all()}
        self.templates = {r.id: r for r in self._template_store.load_all()}

        for snapshot in list(self.snapshots.values()):
            if snapshot.state == SnapshotState.PENDING:
                await self._recover_snapshot(snapshot)
        await self._remove_unused_snapshot_dirs()
        for template in self.templates.values():
            if template.state == TemplateState.BUILDING:
                template.state = TemplateState.FAILED
                template.error = "the gateway restarted while the template was built"
                self._template_store.save(template)

        for record in list(self.instances.values()):
            if record.state not in _LIVE_STATES:
                continue
            runtime = self._runtime(record)
            alive = runtime is not None and self.driver.is_alive(runtime)
            if record.template_build or record.state == InstanceState.STARTING or not alive:
                await self.driver.stop(runtime, record.id)
                if record.template_build:
                    self._forget_instance(record)
                    continue
                record.state = InstanceState.EXITED
                record.exit_code = self.driver.exit_code(runtime) if runtime else None
                self._instance_store.save(record)
                logger.info("instance %s exited while the gateway was down", record.id)
                continue
            record.state = InstanceState.RUNNING
            self._instance_store.save(record)
            await self._start_channel(record)
            self._watch(record, runtime)
            logger.info(
                "instance %s still runs (pid %s)", record.id, runtime.pid if runtime else "?"
            )
        logger.info(
            "gateway state loaded from %s: %d instances, %d snapshots, %d templates",
            self.settings.state_dir,
            len(self.instances),
            len(self.snapshots),
            len(self.templates),
        )

    async def close(self, work_timeout_s: float = 60.0) -> None:
        """Finish snapshots and template builds (bounded), then stop watchers and channels.

        Instances keep running, so the next start of the gateway finds them, unless
        `settings.delete_instances_on_exit` is set. What the instances share, such as an
        empty cgroup parent, is removed.
        """
        if self.settings.delete_instances_on_exit:
            logger.info("deleting every instance before the gateway stops")
            await self.delete_all_instances(work_timeout_s)
        if self._work:
            logger.info("waiting for %d snapshots and template builds", len(self._work))
            _, pending = await asyncio.wait(list(self._work), timeout=work_timeout_s)
            for task in pending:
                logger.error(
                    "cancelling %s: still running after %.0f s", task.get_name(), work_timeout_s
                )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in list(self._channels.values()):
            await channel.close()
        self._channels.clear()
        await self.callbacks.aclose()
        # The driver keeps a cgroup parent that still holds instances.
        self.driver.release_shared()

    def health(self) -> Health:
        capabilities = self.driver.capabilities()
        return Health(status="ok" if capabilities.available else "degraded", drivers=[capabilities])

    # Instances

    async def create_instance(self, request: InstanceCreateRequest) -> InstanceCreateResponse:
        reference = self._reference(request.image)
        async with self._name_lock(request.name):
            existing = self._instance_by_name(request.name)
            if existing is not None:
                return self._existing_instance(existing, reference=reference, restored_from=None)

            image = self.images.resolve(reference)
            self._check_limits(request.cpu, request.memory_gb)
            env = dict(request.env)
            workload_url = env.pop(WORKLOAD_URL_VAR, None)
            workload_token = env.pop(WORKLOAD_TOKEN_VAR, None)
            template = self._usable_template(image.manifest.digest)
            record = InstanceRecord(
                id=new_id("inst"),
                name=request.name,
                image=reference,
                image_digest=image.manifest.digest,
                cpu=request.cpu,
                memory_gb=request.memory_gb,
                env=env,
                metadata=request.metadata,
                workload_url=workload_url,
                workload_token=workload_token,
                template_id=template.id if template else None,
            )
            snapshot = (
                self.snapshots[template.snapshot_id] if template and template.snapshot_id else None
            )
            timing = await self._launch(record, image, snapshot)
        return InstanceCreateResponse(id=record.id, timing=timing)

    def get_instance(self, instance_id: str) -> Instance:
        record = self._instance(instance_id)
        return Instance(
            id=record.id,
            name=record.name,
            image=record.image,
            state=record.state,
            cpu=record.cpu,
            memory_gb=record.memory_gb,
            metadata=record.metadata,
            exit_code=record.exit_code,
            created_at=record.created_at,
            generation=record.generation,
            restored_from=record.restored_from,
            template_id=record.template_id,
        )

    def list_instances(self) -> list[Instance]:
        return [
            self.get_instance(record.id) for record in self.instances.values() if record.visible
        ]

    def instance_output(self, instance_id: str, tail_bytes: int | None = None) -> bytes:
        record = self._instance(instance_id)
        return self._read_output(record, tail_bytes)

    def _read_output(self, record: InstanceRecord, tail_bytes: int | None) -> bytes:
        path = self.driver.output_path(self._instance_dir(record.id))
        try:
            return read_regular(path, tail_bytes)
        except FileNotFoundError:
            return b""
        except NotRegularFileError as error:
            logger.warning("not reading the output of instance %s: %s", record.id, error)
            return b""

    async def delete_instance(self, instance_id: str) -> None:
        """Stop an instance and remove its files; deleting a deleted instance does nothing."""
        record = self.instances.get(instance_id)
        # A template build's instance belongs to its template, so the instance routes hide it.
        if record is None or record.template_build:
            raise NotFoundError(f"instance '{instance_id}' not found")
        if record.state == InstanceState.DELETED:
            return
        if record.state == InstanceState.SNAPSHOTTING:
            raise ConflictError(
                f"Cannot delete instance '{instance_id}': it is snapshotting; "
                "delete it after the snapshot callback"
            )
        await self._teardown(record)
        record.state = InstanceState.DELETED
        record.runtime = None
        self._instance_store.save(record)
        logger.info("instance %s (%s) deleted", record.id, record.name)

    async def delete_all_instances(self, work_timeout_s: float = 60.0) -> None:
        """Delete every instance, waiting for snapshots in flight first, for tests and teardown.

        Then the driver removes what instances share, such as the sandbox's cgroup parent.
        """
        if self._work:
            await asyncio.wait(list(self._work), timeout=work_timeout_s)
        for record in list(self.instances.values()):
            if not record.visible:
                continue
            try:
                await self.delete_instance(record.id)
            except GatewayError as error:
                logger.error("cannot delete instance %s (%s): %s", record.id, record.name, error)
        self.driver.release_shared()

    # Snapshots

    def request_snapshot(self, instance_id: str, callback: CallbackTarget) -> SnapshotRecord:
        """Start a snapshot in the background; raise at once when the instance cannot be one."""
        record = self._instance(instance_id)
        if record.state != InstanceState.RUNNING:
            raise ConflictError(
                f"Cannot snapshot instance '{instance_id}': it is {record.state.value}; "
                "only a running instance can be snapshotted"
            )
        snapshot = SnapshotRecord(
            id=new_id("snap"),
            instance_id=record.id,
            instance_name=record.name,
            image=record.image,
            image_digest=record.image_digest,
            env=record.env,
            workload_url=record.workload_url,
            workload_token=record.workload_token,
            generation=record.generation,
            callback=callback,
        )
        self.snapshots[snapshot.id] = snapshot
        self._snapshot_store.save(snapshot)
        record.state = InstanceState.SNAPSHOTTING
        self._instance_store.save(record)
        self._spawn(self._snapshot_in_background(record, snapshot, callback), work=True)
        logger.info("snapshot %s of instance %s requested", snapshot.id, record.id)
        return snapshot

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        snapshot = self._snapshot(snapshot_id)
        return Snapshot(
            id=snapshot.id,
            instance_id=snapshot.instance_id,
            state=snapshot.state,
            size_bytes=snapshot.size_bytes,
            error=snapshot.error,
            created_at=snapshot.created_at,
            duration_ms=snapshot.duration_ms,
            timing=snapshot.timing,
        )

    async def delete_snapshot(self, snapshot_id: str) -> None:
        snapshot = self.snapshots.get(snapshot_id)
        if snapshot is None:
            raise NotFoundError(f"snapshot '{snapshot_id}' not found")
        if snapshot.state == SnapshotState.DELETED:
            return
        if snapshot.state == SnapshotState.PENDING:
            raise ConflictError(
                f"Cannot delete snapshot '{snapshot_id}': it is pending; "
                "delete it after its callback"
            )
        if snapshot.template_id is not None:
            raise ConflictError(
                f"Cannot delete snapshot '{snapshot_id}': "
                f"it backs template '{snapshot.template_id}'"
            )
        await asyncio.to_thread(shutil.rmtree, self._snapshot_dir(snapshot.id), True)
        snapshot.state = SnapshotState.DELETED
        self._snapshot_store.save(snapshot)
        logger.info("snapshot %s deleted", snapshot.id)

    async def restore_snapshot(
        self, snapshot_id: str, request: SnapshotRestoreRequest
    ) -> SnapshotRestoreResponse:
        snapshot = self._snapshot(snapshot_id)
        if snapshot.state != SnapshotState.COMPLETED:
            raise ConflictError(
                f"Cannot restore snapshot '{snapshot_id}': it is {snapshot.state.value}; "
                "only a completed snapshot can be restored"
            )
        async with self._name_lock(request.name):
            existing = self._instance_by_name(request.name)
            if existing is not None:
                response = self._existing_instance(
                    existing, reference=snapshot.image, restored_from=snapshot.id
                )
                return SnapshotRestoreResponse(id=response.id, timing=response.timing)

            self._check_limits(request.cpu, request.memory_gb)
            image = self.images.resolve_digest(snapshot.image_digest, snapshot.image)
            env = dict(snapshot.env)
            workload_url, workload_token = snapshot.workload_url, snapshot.workload_token
            for key, value in request.metadata.items():
                if key == WORKLOAD_URL_VAR:
                    workload_url = value
                elif key == WORKLOAD_TOKEN_VAR:
                    workload_token = value
                else:
                    env[key] = value
            record = InstanceRecord(
                id=new_id("inst"),
                name=request.name,
                image=snapshot.image,
                image_digest=snapshot.image_digest,
                cpu=request.cpu,
                memory_gb=request.memory_gb,
                env=env,
                metadata=request.metadata,
                workload_url=workload_url,
                workload_token=workload_token,
                generation=snapshot.generation + 1,
                restored_from=snapshot.id,
            )
            timing = await self._launch(record, image, snapshot)
        return SnapshotRestoreResponse(id=record.id, timing=timing)

    # Templates

    async def create_template(
        self, request: TemplateCreateRequest
    ) -> tuple[TemplateRecord, asyncio.Task[TemplateRecord]]:
        """Validate the request, record the template, and start its build as a task."""
        reference = self._reference(request.image)
        image = self.images.resolve(reference)
        self._check_limits(request.cpu, request.memory_gb)
        template = TemplateRecord(
            id=new_id("tpl"),
            image=reference,
            image_digest=image.manifest.digest,
            cpu=request.cpu,
            memory_gb=request.memory_gb,
        )
        self.templates[template.id] = template
        self._template_store.save(template)
        task = self._spawn(self._build_template(template, image, request.callback), work=True)
        return template, task

    @staticmethod
    def template_response(template: TemplateRecord) -> TemplateCreateResponse:
        return TemplateCreateResponse(
            template_id=template.id,
            image=template.image,
            status=template.state.value,
            duration_ms=template.duration_ms,
            error=template.error,
            snapshot_id=template.snapshot_id,
        )

    def get_template(self, template_id: str) -> TemplateRecord:
        template = self.templates.get(template_id)
        if template is None:
            raise NotFoundError(f"template '{template_id}' not found")
        return template

    # Launching

    async def _launch(
        self, record: InstanceRecord, image: Image, snapshot: SnapshotRecord | None
    ) -> dict[str, Any]:
        """Start `record`'s process cold or from `snapshot`; on failure remove every trace."""
        started = time.perf_counter()
        instance_dir = self._instance_dir(record.id)
        instance_dir.mkdir(parents=True)
        self.instances[record.id] = record
        self._instance_store.save(record)
        timing: dict[str, Any] = {"mode": "cold" if snapshot is None else "restore"}
        if snapshot is not None and snapshot.template_id is not None:
            timing["mode"] = "template"
        try:
            channel_started = time.perf_counter()
            await self._start_channel(record)
            timing["channel_ms"] = _elapsed_ms(channel_started)

            spec = self._spec(record, image)
            driver_started = time.perf_counter()
            if snapshot is None:
                runtime = await self.driver.start(spec)
                timing["boot_ms"] = _elapsed_ms(driver_started)
            else:
                runtime = await self.driver.restore(spec, self._snapshot_dir(snapshot.id))
                timing["restore_ms"] = _elapsed_ms(driver_started)
        except BaseException as error:
            logger.error("instance %s (%s) failed to start: %s", record.id, record.name, error)
            await self._teardown(record)
            self._forget_instance(record)
            if isinstance(error, OSError):
                raise SandboxError(f"cannot start instance '{record.name}': {error}") from error
            raise

        record.runtime = asdict(runtime)
        record.state = InstanceState.RUNNING
        timing.update(runtime.timing)
        timing["total_ms"] = _elapsed_ms(started)
        record.timing = timing
        self._instance_store.save(record)
        self._watch(record, runtime)
        logger.info(
            "instance %s (%s) running: image %s, mode %s, %.1f ms",
            record.id, record.name, record.image, timing["mode"], timing["total_ms"],
        )  # fmt: skip
        return timing

    async def _teardown(self, record: InstanceRecord) -> None:
        """Stop the process, the channel and the limits, and remove the instance directory."""
        channel = self._channels.pop(record.id, None)
        if channel is not None:
            await channel.close()
        await self.driver.stop(self._runtime(record), record.id)
        await asyncio.to_thread(shutil.rmtree, self._instance_dir(record.id), True)
        self._ready.pop(record.id, None)

    def _forget_instance(self, record: InstanceRecord) -> None:
        self.instances.pop(record.id, None)
        self._instance_store.delete(record.id)

    async def _start_channel(self, record: InstanceRecord) -> None:
        ready = self._ready.setdefault(record.id, asyncio.Event())
        channel = ChannelServer(
            self.driver.channel_socket(self._instance_dir(record.id)),
            identity=lambda: self._identity(record),
            on_ready=ready.set,
            workload_url=record.workload_url,
            workload_token=record.workload_token,
            label=record.id,
        )
        await channel.start()
        self._channels[record.id] = channel

    @staticmethod
    def _identity(record: InstanceRecord) -> dict[str, Any]:
        return {
            "id": record.id,
            "name": record.name,
            "image": record.image,
            "env": record.env,
            "metadata": record.metadata or {},
            "generation": record.generation,
            "restored_from": record.restored_from,
        }

    def _watch(self, record: InstanceRecord, runtime: Runtime | None) -> None:
        if runtime is not None:
            self._spawn(self._watch_exit(record, runtime))

    async def _watch_exit(self, record: InstanceRecord, runtime: Runtime) -> None:
        await self.driver.wait(runtime)
        if record.runtime is None or record.runtime.get("pid") != runtime.pid:
            return
        if record.state == InstanceState.EXITED and record.exit_code is None:
            # A read noticed the exit first, before the exit status was written.
            record.exit_code = self.driver.exit_code(runtime)
            self._instance_store.save(record)
        if record.state != InstanceState.RUNNING:
            return
        record.state = InstanceState.EXITED
        record.exit_code = self.driver.exit_code(runtime)
        self._instance_store.save(record)
        channel = self._channels.pop(record.id, None)
        if channel is not None:
            await channel.close()
        self._ready.pop(record.id, None)
        logger.info(
            "instance %s (%s) exited with code %s", record.id, record.name, record.exit_code
        )

    # Snapshot and template work

    async def _checkpoint(self, record: InstanceRecord, snapshot: SnapshotRecord) -> None:
        """Pause the channel, dump the instance into the snapshot's directory and stop it."""
        runtime = self._runtime(record)
        if runtime is None:
            raise GatewayError(f"instance '{record.id}' has no process to snapshot")
        capabilities = self.driver.capabilities()
        if not capabilities.snapshots:
            raise SnapshotsUnavailableError(
                f"snapshots are unavailable on this gateway: {capabilities.detail}"
            )
        channel = self._channels.get(record.id)
        if channel is not None:
            await channel.pause(self.settings.drain_timeout_s)
        image = self.images.resolve_digest(record.image_digest, record.image)
        snapshot_dir = self._snapshot_dir(snapshot.id)
        try:
            result = await self.driver.checkpoint(runtime, self._spec(record, image), snapshot_dir)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, snapshot_dir, True)
            raise
        snapshot.size_bytes = result.size_bytes
        snapshot.timing = result.timing

    async def _snapshot_in_background(
        self, record: InstanceRecord, snapshot: SnapshotRecord, callback: CallbackTarget
    ) -> None:
        started = time.perf_counter()
        error_text: str | None = None
        try:
            await self._checkpoint(record, snapshot)
        except Exception as error:
            error_text = str(error)
            if not isinstance(error, GatewayError):
                logger.exception("snapshot %s of instance %s failed", snapshot.id, record.id)
                error_text = f"snapshot failed unexpectedly: {error!r}"

        snapshot.duration_ms = _elapsed_ms(started)
        if error_text is None:
            snapshot.state = SnapshotState.COMPLETED
            record.state = InstanceState.STOPPED
            record.runtime = None
            channel = self._channels.pop(record.id, None)
            if channel is not None:
                await channel.close()
            self._ready.pop(record.id, None)
            logger.info(
                "snapshot %s of instance %s completed: %s bytes in %.1f ms",
                snapshot.id, record.id, snapshot.size_bytes, snapshot.duration_ms,
            )  # fmt: skip
        else:
            snapshot.state = SnapshotState.FAILED
            snapshot.error = error_text
            await self._resume_after_failed_snapshot(record)
            logger.error(
                "snapshot %s of instance %s failed: %s", snapshot.id, record.id, error_text
            )
        self._snapshot_store.save(snapshot)
        self._instance_store.save(record)

        payload = SnapshotCallback(
            status=CallbackStatus.COMPLETED if error_text is None else CallbackStatus.FAILED,
            snapshot_id=snapshot.id,
            instance_id=record.id,
            error=error_text,
            metadata=callback.metadata,
            duration_ms=snapshot.duration_ms,
        )
        await self.callbacks.send(str(callback.url), payload, context=f"snapshot {snapshot.id}")

    async def _recover_snapshot(self, snapshot: SnapshotRecord) -> None:
        """Finish a snapshot that was pending when the gateway stopped, or mark it failed.

        A dump that completed already stopped the instance, so its snapshot is completed
        and the instance stopped. Either way the callback the snapshot owed is sent.
        """
        record = self.instances.get(snapshot.instance_id)
        snapshot_dir = self._snapshot_dir(snapshot.id)
        result = None
        error_text = "the gateway restarted before the snapshot's dump completed"
        if record is not None:
            try:
                image = self.images.resolve_digest(record.image_digest, record.image)
                result = await self.driver.recover_checkpoint(
                    self._runtime(record), self._spec(record, image), snapshot_dir
                )
            except (GatewayError, OSError) as error:
                error_text = (
                    f"the gateway restarted during the snapshot and cannot finish it: {error}"
                )

        if result is not None and record is not None:
            snapshot.state = SnapshotState.COMPLETED
            snapshot.size_bytes = result.size_bytes
            snapshot.timing = result.timing
            record.state = InstanceState.STOPPED
            record.runtime = None
            self._instance_store.save(record)
            logger.info(
                "snapshot %s of instance %s completed after a gateway restart: %s bytes",
                snapshot.id, snapshot.instance_id, snapshot.size_bytes,
            )  # fmt: skip
        else:
            snapshot.state = SnapshotState.FAILED
            snapshot.error = error_text
            logger.error(
                "snapshot %s of instance %s failed: %s",
                snapshot.id, snapshot.instance_id, error_text,
            )  # fmt: skip
        self._snapshot_store.save(snapshot)

        if snapshot.callback is None:
            logger.warning(
                "snapshot %s has no stored callback target, so its result is not sent",
                snapshot.id,
            )
            return
        payload = SnapshotCallback(
            status=CallbackStatus.COMPLETED
            if snapshot.state == SnapshotState.COMPLETED
            else CallbackStatus.FAILED,
            snapshot_id=snapshot.id,
            instance_id=snapshot.instance_id,
            error=snapshot.error,
            metadata=snapshot.callback.metadata,
        )
        url = str(snapshot.callback.url)
        self._spawn(self.callbacks.send(url, payload, context=f"snapshot {snapshot.id}"), work=True)

    async def _remove_unused_snapshot_dirs(self) -> None:
        """Delete the directories of failed and deleted snapshots, and of unknown ids."""
        snapshots_dir = self.settings.state_dir / "snapshots"
        if not snapshots_dir.is_dir():
            return
        for path in snapshots_dir.iterdir():
            snapshot = self.snapshots.get(path.name)
            if snapshot is not None and snapshot.state == SnapshotState.COMPLETED:
                continue
            if snapshot is not None and snapshot.state == SnapshotState.PENDING:
                continue
            logger.info("removing the directory of unusable snapshot %s", path.name)
            await asyncio.to_thread(shutil.rmtree, path, True)

    async def _resume_after_failed_snapshot(self, record: InstanceRecord) -> None:
        runtime = self._runtime(record)
        if runtime is not None and self.driver.is_alive(runtime):
            record.state = InstanceState.RUNNING
            channel = self._channels.get(record.id)
            if channel is not None:
                await channel.resume()
            return
        record.state = InstanceState.EXITED
        channel = self._channels.pop(record.id, None)
        if channel is not None:
            await channel.close()

    async def _build_template(
        self, template: TemplateRecord, image: Image, callback: CallbackTarget | None
    ) -> TemplateRecord:
        """Boot the image, wait for the runner's ready, checkpoint it, and report the result."""
        started = time.perf_counter()
        build = InstanceRecord(
            id=new_id("tplinst"),
            name=f"template-{template.id}",
            image=template.image,
            image_digest=template.image_digest,
            cpu=template.cpu,
            memory_gb=template.memory_gb,
            template_build=True,
        )
        try:
            capabilities = self.driver.capabilities()
            if not capabilities.snapshots:
                raise SnapshotsUnavailableError(
                    f"templates need snapshots, which are unavailable: {capabilities.detail}"
                )
            await self._launch(build, image, None)
            await self._wait_ready(build)
            snapshot = SnapshotRecord(
                id=new_id("snap"),
                instance_id=build.id,
                instance_name=build.name,
                image=build.image,
                image_digest=build.image_digest,
                template_id=template.id,
            )
            build.state = InstanceState.SNAPSHOTTING
            await self._checkpoint(build, snapshot)
            snapshot.state = SnapshotState.COMPLETED
            snapshot.duration_ms = _elapsed_ms(started)
            self.snapshots[snapshot.id] = snapshot
            self._snapshot_store.save(snapshot)
            template.snapshot_id = snapshot.id
            template.state = TemplateState.COMPLETED
        except Exception as error:
            template.state = TemplateState.FAILED
            template.error = str(error) if isinstance(error, GatewayError) else repr(error)
            log = logger.error if isinstance(error, GatewayError) else logger.exception
            log("template %s of image %s failed: %s", template.id, template.image, error)
        finally:
            if build.id in self.instances:
                await self._teardown(build)
                self._forget_instance(build)
        template.duration_ms = _elapsed_ms(started)
        self._template_store.save(template)
        if template.state == TemplateState.COMPLETED:
            logger.info(
                "template %s of image %s ready in %.1f ms",
                template.id, template.image, template.duration_ms,
            )  # fmt: skip

        if callback is not None:
            payload = TemplateCallback(
                template_id=template.id,
                image=template.image,
                status=CallbackStatus.COMPLETED
                if template.state == TemplateState.COMPLETED
                else CallbackStatus.FAILED,
                error=template.error,
                metadata=callback.metadata,
                duration_ms=template.duration_ms,
            )
            await self.callbacks.send(str(callback.url), payload, context=f"template {template.id}")
        return template

    async def _wait_ready(self, record: InstanceRecord) -> None:
        """Wait until the runner posts ready, failing early if its process exits."""
        ready = self._ready.setdefault(record.id, asyncio.Event())
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while not ready.is_set():
            if record.state != InstanceState.RUNNING:
                output = self._read_output(record, tail_bytes=800).decode(errors="replace")
                raise GatewayError(
                    f"the runtime of image {record.image} exited before it reported ready "
                    f"(exit code {record.exit_code}); its output ends with: {output.strip()}"
                )
            if time.monotonic() > deadline:
                raise GatewayError(
                    f"the runtime of image {record.image} did not report ready within "
                    f"{self.settings.ready_timeout_s} s; check that it posts /_gateway/ready"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), 0.1)

    # Lookups and checks

    def _instance(self, instance_id: str) -> InstanceRecord:
        record = self.instances.get(instance_id)
        if record is None or not record.visible:
            raise NotFoundError(f"instance '{instance_id}' not found")
        self._refresh(record)
        return record

    def _refresh(self, record: InstanceRecord) -> None:
        """Mark a running instance whose process is gone as exited."""
        if record.state != InstanceState.RUNNING:
            return
        runtime = self._runtime(record)
        if runtime is None or not self.driver.is_alive(runtime):
            record.state = InstanceState.EXITED
            record.exit_code = self.driver.exit_code(runtime) if runtime else None
            self._instance_store.save(record)

    def _snapshot(self, snapshot_id: str) -> SnapshotRecord:
        snapshot = self.snapshots.get(snapshot_id)
        if snapshot is None or snapshot.state == SnapshotState.DELETED:
            raise NotFoundError(f"snapshot '{snapshot_id}' not found")
        return snapshot

    def _instance_by_name(self, name: str) -> InstanceRecord | None:
        for record in self.instances.values():
            if record.name == name and record.state != InstanceState.DELETED:
                return record
        return None

    def _existing_instance(
        self, existing: InstanceRecord, *, reference: str, restored_from: str | None
    ) -> InstanceCreateResponse:
        """Return the instance a retried request already created, or raise if it differs."""
        if existing.image != reference or existing.restored_from != restored_from:
            source = f"snapshot '{restored_from}'" if restored_from else f"image {reference}"
            raise ConflictError(
                f"instance name '{existing.name}' is taken by instance '{existing.id}' "
                f"(image {existing.image}), so it cannot be created from {source}; "
                "choose another name or delete that instance"
            )
        logger.info("instance %s (%s) already exists; returning it", existing.id, existing.name)
        return InstanceCreateResponse(id=existing.id, timing={"mode": "existing"})

    def _usable_template(self, digest: str) -> TemplateRecord | None:
        if not self.driver.capabilities().snapshots:
            return None
        candidates = [
            t
            for t in self.templates.values()
            if t.image_digest == digest and t.state == TemplateState.COMPLETED and t.snapshot_id
        ]
        return max(candidates, key=lambda t: t.created_at, default=None)

    def _check_limits(self, cpu: float, memory_gb: float) -> None:
        if cpu > self.settings.max_cpu:
            raise InvalidRequestError(
                f"cpu {cpu} is more than this gateway allows ({self.settings.max_cpu}); "
                "request fewer CPUs or raise VMFLOW_GATEWAY_MAX_CPU"
            )
        if memory_gb < self.settings.min_memory_gb:
            raise InvalidRequestError(
                f"memory_gb {memory_gb} is less than the minimum {self.settings.min_memory_gb} "
                "that a Python runtime needs; request more memory"
            )
        host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
        if memory_gb > host_gb:
            raise InvalidRequestError(
                f"memory_gb {memory_gb} is more than this host's {host_gb:.1f} GiB; request less"
            )

    @staticmethod
    def _reference(image: str) -> str:
        try:
            return strip_image_digest(image)
        except InvalidImageReferenceError as error:
            raise ImageError(str(error)) from None

    def _runtime(self, record: InstanceRecord) -> Runtime | None:
        return Runtime(**record.runtime) if record.runtime else None

    def _spec(self, record: InstanceRecord, image: Image) -> LaunchSpec:
        return LaunchSpec(
            instance_id=record.id,
            image=image,
            env=record.env,
            cpu=record.cpu,
            memory_gb=record.memory_gb,
            instance_dir=self._instance_dir(record.id),
        )

    def _instance_dir(self, instance_id: str) -> Path:
        return self.settings.state_dir / "instances" / instance_id

    def _snapshot_dir(self, snapshot_id: str) -> Path:
        return self.settings.state_dir / "snapshots" / snapshot_id

    def _name_lock(self, name: str) -> asyncio.Lock:
        return self._name_locks.setdefault(name, asyncio.Lock())

    def _spawn(
        self, coroutine: Coroutine[Any, Any, Any], *, work: bool = False
    ) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if work:
            self._work.add(task)
            task.add_done_callback(self._work.discard)
        return task
