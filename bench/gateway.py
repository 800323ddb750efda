"""Benchmark the sandbox gateway: cold versus template create, snapshot and restore.

Run as root with CRIU 4 installed (scripts/install-criu.sh):

    .venv/bin/python bench/gateway.py [--runs 5] [--list-size 3000000]

It starts a real gateway on a free 127.0.0.1 port with its state in a temporary
directory, builds an image whose program imports what a typical task imports
(fastapi, httpx, pydantic, sqlalchemy, temporalio) and then keeps a counter and a
list of --list-size integers, and measures each operation as the client sees it
(HTTP round trip included). An instance counts as created once its program prints its first tick,
and a snapshot as taken once its callback arrives. Each figure is the median of
--runs runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request, Response

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import serve_app
from vmflow.compute.client import ComputeClient
from vmflow.compute.models import (
    CallbackTarget,
    InstanceCreateRequest,
    SnapshotRequest,
    SnapshotRestoreRequest,
    TemplateCreateRequest,
)
from vmflow.gateway.drivers.cgroups import CGROUP_ROOT, CONTROLLERS
from vmflow.gateway.images import ImageStore
from vmflow.gateway.server import GatewayServer
from vmflow.gateway.settings import GatewaySettings

PROGRAMS = Path(__file__).resolve().parents[1] / "tests" / "gateway" / "programs"
TOKEN = uuid.uuid4().hex


async def wait_for_output(
    compute: ComputeClient, instance_id: str, check: Callable[[str], bool]
) -> None:
    deadline = time.monotonic() + 120
    while True:
        text = (await compute.request("GET", f"/api/instances/{instance_id}/logs")).text
        if check(text):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"instance {instance_id} did not start; output:\n{text[-1000:]}")
        await asyncio.sleep(0.002)


def build_image(image_dir: Path, workdir: Path, list_size: int) -> str:
    project = workdir / "project"
    shutil.copytree(PROGRAMS, project)
    # The list size is a default in the program, because a template boots without the env.
    counter = project / "counter.py"
    counter.write_text(counter.read_text().replace('"3000000"', f'"{list_size}"'))
    (project / "marker.txt").write_text(str(workdir))
    (project / "vmflow.toml").write_text(
        '[image]\nname = "bench"\ntasks = ["counter"]\ncommand = ["python", "heavy.py"]\n'
    )
    reference = f"bench:{uuid.uuid4().hex[:8]}"
    ImageStore(image_dir).build(project, reference)
    return reference


async def create_and_wait(
    compute: ComputeClient, image: str, env: dict[str, str]
) -> tuple[str, float, str]:
    started = time.perf_counter()
    created = await compute.instances.create(
        InstanceCreateRequest(
            name=f"bench-{uuid.uuid4().hex[:10]}", image=image, env=env, cpu=1, memory_gb=1
        )
    )
    before = (await compute.request("GET", f"/api/instances/{created.id}/logs")).text.count("tick ")
    await wait_for_output(compute, created.id, lambda text: text.count("tick ") > before)
    mode = (created.timing or {}).get("mode", "?")
    return created.id, time.perf_counter() - started, mode


async def run(runs: int, list_size: int) -> dict[str, list[float]]:
    workdir = Path(tempfile.mkdtemp(prefix="vmflow-bench-"))
    settings = GatewaySettings(
        host="127.0.0.1",
        port=0,
        auth_token=TOKEN,
        callback_secret=uuid.uuid4().hex,
        state_dir=workdir / "state",
        image_dir=workdir / "images",
        cgroup_parent=f"vmflow-bench-{uuid.uuid4().hex[:8]}",
    )  # type: ignore[arg-type]
    env = {"COUNTER_LIST_SIZE": str(list_size)}
    results: dict[str, list[float]] = {
        "cold": [],
        "template": [],
        "snapshot": [],
        "restore": [],
        "size": [],
    }
    callbacks: asyncio.Queue[bytes] = asyncio.Queue()
    receiver = FastAPI()

    @receiver.post("/callback")
    async def receive(request: Request) -> Response:
        await callbacks.put(await request.body())
        return Response(status_code=204)

    try:
        async with serve_app(receiver) as callback_base, GatewayServer(settings) as server:
            async with ComputeClient(server.url, auth_token=TOKEN, timeout_s=300) as compute:
                health = await compute.health()
                if not health.drivers[0].snapshots:
                    raise SystemExit(f"snapshots unavailable: {health.drivers[0].detail}")
                # Two images with distinct digests, so that cold creates never find a template.
                cold_image = build_image(settings.image_dir, workdir / "cold", list_size)
                template_image = build_image(settings.image_dir, workdir / "template", list_size)

                for _ in range(runs):
                    instance_id, seconds, _mode = await create_and_wait(compute, cold_image, env)
                    results["cold"].append(seconds)

                    started = time.perf_counter()
                    await compute.instances.snapshot(
                        instance_id,
                        SnapshotRequest(callback=CallbackTarget(url=f"{callback_base}/callback")),
                    )
                    callback = await callbacks.get()
                    results["snapshot"].append(time.perf_counter() - started)
                    snapshot_id = json.loads(callback)["snapshot_id"]
                    snapshot = await compute.snapshots.get(snapshot_id)
                    results["size"].append(float(snapshot.size_bytes or 0))
                    await compute.instances.delete(instance_id)

                    started = time.perf_counter()
                    restored = await compute.snapshots.restore(
                        snapshot_id,
                        SnapshotRestoreRequest(
                            name=f"bench-r-{uuid.uuid4().hex[:8]}", cpu=1, memory_gb=1
                        ),
                    )
                    assert restored is not None
                    before = (
                        await compute.request("GET", f"/api/instances/{restored.id}/logs")
                    ).text.count("tick ")
                    await wait_for_output(
                        compute, restored.id, lambda text, b=before: text.count("tick ") > b
                    )
                    results["restore"].append(time.perf_counter() - started)
                    await compute.instances.delete(restored.id)
                    await compute.snapshots.delete(snapshot_id)

                template = await compute.templates.create(
                    TemplateCreateRequest(image=template_image, cpu=1, memory_gb=1)
                )
                if template is None or template.status != "completed":
                    raise SystemExit(f"template build failed: {template}")
                for _ in range(runs):
                    instance_id, seconds, mode = await create_and_wait(compute, template_image, env)
                    if mode != "template":
                        raise SystemExit(f"expected a template create, got mode {mode}")
                    results["template"].append(seconds)
                    await compute.instances.delete(instance_id)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for controller in CONTROLLERS:
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / controller / settings.cgroup_parent).rmdir()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="Runs per operation (default 5).")
    parser.add_argument(
        "--list-size", type=int, default=1_000_000, help="Integers the program keeps in memory."
    )
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the sandbox driver needs root; run this benchmark as root")

    results = asyncio.run(run(arguments.runs, arguments.list_size))
    median = {name: statistics.median(values) for name, values in results.items()}
    print(
        f"vmflow gateway benchmark: sandbox driver, {arguments.runs} runs each, "
        f"{arguments.list_size} integers in memory, {os.cpu_count()} CPUs"
    )
    print(f"{'operation':<28}{'median':>12}{'min':>12}{'max':>12}")
    for name, label in [
        ("cold", "create, cold boot"),
        ("template", "create, from template"),
        ("snapshot", "snapshot (to callback)"),
        ("restore", "restore (to first tick)"),
    ]:
        values = results[name]
        low, high = min(values) * 1000, max(values) * 1000
        print(f"{label:<28}{median[name] * 1000:>10.1f}ms{low:>10.1f}ms{high:>10.1f}ms")
    print(f"{'snapshot size':<28}{median['size'] / 1024**2:>10.1f}MiB")
    print(f"{'cold / template ratio':<28}{median['cold'] / median['template']:>11.2f}x")


if __name__ == "__main__":
    main()
