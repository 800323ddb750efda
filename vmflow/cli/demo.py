"""`vmflow demo`: deploy the example image, run the approval task through a snapshot, show how.

The demo uses a running stack when its API responds at VMFLOW_API_URL and
starts one of its own otherwise, which it stops at the end. Steps: build
`examples/approval-report`, deploy it with a pre-warmed template, trigger
`approval-report` on Seattle's weather data, wait until the suspended run
has been snapshotted, complete its approval token, and print the timeline
read from the run's workflow history, the report and the Temporal UI link.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.markdown import Markdown
from rich.table import Table
from temporalio.client import Client

import vmflow
from vmflow.cli.client import ApiClient, ApiClientError
from vmflow.cli.common import console, error_console, poll_until
from vmflow.cli.deploy import ImageInspectionError, deploy_image, wait_for_deployment
from vmflow.cli.dev import Terminate, raise_terminate, stack_table, watch_until_a_part_exits
from vmflow.cli.local import (
    DEFAULT_TEMPORAL_ADDRESS,
    DEFAULT_TEMPORAL_UI_URL,
    LocalStateError,
    read_secrets,
    read_stack_addresses,
    resolve_api_key,
    resolve_api_url,
    secrets_path,
)
from vmflow.cli.runs import FINAL_STATUSES, run_watcher
from vmflow.cli.stack import LocalStack, StackError, StackPorts, free_port, probe_port
from vmflow.cli.timeline import RunTimeline, read_run_timeline
from vmflow.compute.models import Health
from vmflow.config import default_data_dir
from vmflow.gateway.images import ImageStore
from vmflow.gateway.settings import load_gateway_settings
from vmflow.storage.models import TaskRunStatus, WorkloadType

EXAMPLE_DIR = Path(vmflow.__file__).resolve().parent.parent / "examples" / "approval-report"
DEMO_IMAGE = "approval-report:demo"
DEMO_PROJECT = "demo"
DEMO_TASK = "approval-report"
DEMO_SNAPSHOT_DELAY_MS = 2000


@dataclass
class DemoTargets:
    """Addresses and key of the demo's stack, whether it was started here or found running."""

    api_url: str
    api_key: str
    temporal_address: str
    temporal_ui_url: str
    # Checked before the demo starts, when known, so a gateway that cannot
    # snapshot fails the demo at once instead of after its timeout.
    gateway_url: str | None = None
    gateway_token: str | None = None

    @classmethod
    def of_stack(cls, stack: LocalStack) -> DemoTargets:
        """Return the targets of a local stack that this process started."""
        assert stack.secrets is not None
        return cls(
            api_url=stack.api_url,
            api_key=stack.secrets.api_key,
            temporal_address=stack.temporal_address,
            temporal_ui_url=stack.temporal_ui_url,
            gateway_url=stack.gateway_url,
            gateway_token=stack.secrets.gateway_token,
        )


@dataclass
class DemoResult:
    deployment: dict[str, Any]
    run: dict[str, Any]
    timeline: RunTimeline
    ui_link: str


def run_demo(
    targets: DemoTargets,
    *,
    emit: Any = console.print,
    timeout_s: float = 300,
    payload: dict[str, Any] | None = None,
) -> DemoResult:
    """Run the demo's steps against a running stack and return what happened."""
    if targets.gateway_url is not None:
        check_gateway_snapshots(targets.gateway_url, targets.gateway_token)
    emit(f"building {DEMO_IMAGE} from {EXAMPLE_DIR}")
    if not EXAMPLE_DIR.is_dir():
        raise ImageInspectionError(
            f"{EXAMPLE_DIR} is missing; run the demo from a clone of the vmflow repository"
        )
    ImageStore(load_gateway_settings().image_dir).build(EXAMPLE_DIR, DEMO_IMAGE)

    with ApiClient(targets.api_url, targets.api_key) as client:
        deployment = deploy_image(
            client,
            DEMO_IMAGE,
            project=DEMO_PROJECT,
            version=None,
            tasks=None,
            workload_type=WorkloadType.MICROVM,
        )
        emit(f"deployment {deployment['id']}: waiting for its template to be pre-warmed")
        deployment = wait_for_deployment(client, deployment["id"], timeout_s=timeout_s)
        if deployment["status"] != "DEPLOYED":
            raise DemoError(
                f"deployment {deployment['id']} failed: {deployment['error_name']}: "
                f"{deployment['error_message']}"
            )
        emit(
            f"deployed with template {deployment['template_id']} "
            f"(mode {deployment['template_mode']})"
        )

        triggered = client.trigger(
            DEMO_TASK,
            {"deployment_id": deployment["id"], "payload": payload or {"year": 2015}},
        )
        run_id = triggered["run_id"]
        emit(f"triggered run {run_id}")
        watch = run_watcher(emit)

        run = poll_until(
            lambda: client.get_run(run_id),
            lambda run: bool(run["checkpoints"]) or run["status"] in FINAL_STATUSES,
            timeout_s=timeout_s,
            on_value=watch,
            what=f"run {run_id} being snapshotted at its approval waitpoint",
        )
        if run["status"] in FINAL_STATUSES:
            raise DemoError(f"run {run_id} ended {run['status']} before it was snapshotted")
        token = next(waitpoint for waitpoint in run["waitpoints"] if waitpoint["kind"] == "TOKEN")
        client.complete_token(
            token["id"], {"approver": "vmflow demo", "note": "approved after the snapshot"}
        )
        emit(f"completed token {token['id']}")

        run = poll_until(
            lambda: client.get_run(run_id),
            lambda run: run["status"] in FINAL_STATUSES,
            timeout_s=timeout_s,
            on_value=watch,
            what=f"run {run_id} finishing",
        )

    timeline = asyncio.run(_read_timeline(targets.temporal_address, run_id))
    ui_link = (
        f"{targets.temporal_ui_url}/namespaces/default/workflows/"
        f"{quote(timeline.workflow_id, safe='')}"
    )
    return DemoResult(deployment=deployment, run=run, timeline=timeline, ui_link=ui_link)


def check_gateway_snapshots(gateway_url: str, token: str | None) -> None:
    """Raise `DemoError` unless the gateway has a driver that is available and can snapshot."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"{gateway_url}/healthz", headers=headers, timeout=10)
        response.raise_for_status()
        health = Health.model_validate_json(response.content)
    except (httpx.HTTPError, ValueError) as error:
        raise DemoError(f"cannot read the gateway's health at {gateway_url}: {error}") from error
    if not any(driver.available and driver.snapshots for driver in health.drivers):
        details = "; ".join(f"{driver.name}: {driver.detail}" for driver in health.drivers)
        raise DemoError(
            f"the gateway at {gateway_url} cannot take snapshots ({details or 'no driver'}); "
            "the demo needs root and CRIU 4 (run scripts/install-criu.sh as root)"
        )


async def _read_timeline(address: str, run_id: str) -> RunTimeline:
    client = await Client.connect(address)
    return await read_run_timeline(client, run_id)


class DemoError(RuntimeError):
    """A step of the demo did not turn out as the demo expects."""


def print_result(result: DemoResult) -> None:
    table = Table(title=f"timeline of {result.timeline.workflow_id}", title_justify="left")
    table.add_column("+ms", justify="right")
    table.add_column("step")
    table.add_column("detail")
    for entry in result.timeline.entries:
        table.add_row(f"{result.timeline.offset_ms(entry):,.0f}", entry.step, entry.detail)
    console.print(table)

    output = result.run.get("output") or {}
    if result.run["status"] != TaskRunStatus.COMPLETED.value:
        error_console.print(f"[red]run {result.run['id']} ended {result.run['status']}[/]")
    else:
        console.print(
            f"report: aggregated as {output.get('aggregation_id')} by runner "
            f"{output.get('started_as_runner')}, written by runner "
            f"{output.get('finished_as_runner')} after the restore"
        )
        console.print(Markdown(str(output.get("markdown", ""))))
    console.print(f"Temporal UI: {result.ui_link}", soft_wrap=True)


def _running_stack(api_url: str) -> DemoTargets | None:
    """Return the targets of a stack already serving at `api_url`, or None when none responds."""
    try:
        healthy = httpx.get(f"{api_url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return None
    if not healthy:
        return None
    addresses = read_stack_addresses()
    return DemoTargets(
        api_url=api_url,
        api_key=resolve_api_key(),
        temporal_address=os.environ.get("TEMPORAL_ADDRESS")
        or (addresses.temporal_address if addresses else DEFAULT_TEMPORAL_ADDRESS),
        temporal_ui_url=addresses.temporal_ui_url if addresses else DEFAULT_TEMPORAL_UI_URL,
        gateway_url=addresses.gateway_url if addresses else None,
        gateway_token=read_secrets(secrets_path()).gateway_token
        if secrets_path().is_file()
        else None,
    )


def _port_or_free(port: int) -> int:
    """Return `port` when it is free on 127.0.0.1, else a free one."""
    try:
        probe_port(port)
    except OSError:
        return free_port()
    return port


def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data directory of the stack the demo starts.", show_default=False),
    ] = None,
    snapshot_delay_ms: Annotated[
        int, typer.Option(help="Milliseconds the suspended run waits before its snapshot.")
    ] = DEMO_SNAPSHOT_DELAY_MS,
    timeout: Annotated[float, typer.Option(help="Seconds each step may take.")] = 300,
    keep: Annotated[
        bool,
        typer.Option(help="Keep the stack the demo started running until Ctrl-C."),
    ] = False,
) -> None:
    """Deploy the example image, run the approval task through a snapshot and show the timeline."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    directory = data_dir or default_data_dir()
    os.environ["VMFLOW_DATA_DIR"] = str(directory)

    stack: LocalStack | None = None
    previous = signal.signal(signal.SIGTERM, raise_terminate)
    # A shell starts background jobs with SIGINT ignored, and Python then keeps
    # it ignored; Ctrl-C and `kill -INT` must stop the stack all the same.
    previous_interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        targets = _running_stack(resolve_api_url())
        if targets is not None:
            console.print(f"using the stack that is running at {targets.api_url}")
        else:
            stack = LocalStack(
                directory,
                StackPorts(
                    temporal=_port_or_free(7233),
                    temporal_ui=_port_or_free(8233),
                    api=_port_or_free(8080),
                    gateway=_port_or_free(8020),
                ),
                database_url=os.environ.get("DATABASE_URL"),
                environment={"COMPUTE_SNAPSHOT_DELAY_MS": str(snapshot_delay_ms)},
            )
            with console.status("starting the local stack for the demo"):
                stack.start()
            console.print(stack_table(stack, title="local stack of the demo"))
            targets = DemoTargets.of_stack(stack)
        result = run_demo(targets, timeout_s=timeout)
        print_result(result)
        if stack is not None and keep:
            console.print("the demo's stack keeps running for the link; press Ctrl-C to stop it")
            sys.stdout.flush()
            watch_until_a_part_exits(stack)
        elif stack is not None:
            console.print(
                "the demo's stack stops now; pass --keep, or run `vmflow dev` first, to open "
                "the link"
            )
    except (KeyboardInterrupt, Terminate):
        console.print("stopping")
    except (StackError, ApiClientError, LocalStateError, ImageInspectionError, DemoError) as error:
        error_console.print(f"[red]error:[/] {error}")
        raise typer.Exit(1) from None
    except TimeoutError as error:
        error_console.print(f"[red]error:[/] {error}")
        raise typer.Exit(1) from None
    finally:
        if stack is not None:
            stack.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_interrupt)
