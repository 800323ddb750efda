"""`vmflow deploy`: finalize a deployment of a built image and wait for its template rollout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Annotated, Any

import typer

from vmflow.cli.client import ApiClient
from vmflow.cli.common import console, error_console, exit_on_api_error, poll_until
from vmflow.gateway.errors import NotFoundError as ImageNotFoundError
from vmflow.gateway.images import ImageStore
from vmflow.gateway.settings import load_gateway_settings
from vmflow.storage.models import DeploymentStatus, WorkloadType

# Importing a project's task modules is quick; this bounds a module that hangs at import.
LIST_TASKS_TIMEOUT_S = 60


class ImageInspectionError(RuntimeError):
    """The image is not in the local store or its task modules could not be imported."""


def image_task_ids(reference: str) -> tuple[list[str], str, str]:
    """Return the task ids, content digest and `name:tag` reference of a locally built image.

    The ids come from importing the image's task modules in a child process,
    the same way the runner inside an instance loads them.
    """
    store = ImageStore(load_gateway_settings().image_dir)
    try:
        image = store.resolve(reference)
    except ImageNotFoundError as error:
        raise ImageInspectionError(str(error)) from error

    environment = dict(os.environ)
    environment["VMFLOW_TASK_MODULES"] = ",".join(image.manifest.tasks)
    environment["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(image.app_dir), environment.get("PYTHONPATH", "")) if part
    )
    completed = subprocess.run(
        [sys.executable, "-m", "vmflow.runner.agent", "--list-tasks"],
        cwd=image.app_dir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=LIST_TASKS_TIMEOUT_S,
        check=False,
    )
    if completed.returncode != 0:
        raise ImageInspectionError(
            f"importing the task modules of {reference} failed:\n{completed.stderr.strip()}"
        )
    task_ids = json.loads(completed.stdout)
    if not task_ids:
        raise ImageInspectionError(
            f"image {reference} defines no tasks; decorate functions with @task"
        )
    return list(task_ids), image.manifest.digest, f"{image.manifest.name}:{image.manifest.tag}"


def wait_for_deployment(
    client: ApiClient, deployment_id: str, *, timeout_s: float
) -> dict[str, Any]:
    """Poll the deployment until it is DEPLOYED or FAILED; return its last state."""
    final = {DeploymentStatus.DEPLOYED.value, DeploymentStatus.FAILED.value}
    return poll_until(
        lambda: client.get_deployment(deployment_id),
        lambda deployment: deployment["status"] in final,
        timeout_s=timeout_s,
        what=f"deployment {deployment_id} reaching DEPLOYED",
    )


def deploy_image(
    client: ApiClient,
    image: str,
    *,
    project: str,
    version: str | None,
    tasks: list[str] | None,
    workload_type: WorkloadType,
) -> dict[str, Any]:
    """Finalize a deployment of `image`, reading its tasks from the local store when not given."""
    digest = None
    if not tasks:
        # The full `name:tag` keeps `NAME` and `NAME:latest` one deployment.
        tasks, digest, image = image_task_ids(image)
    if version is None:
        # The content digest names the image's files, so redeploying an unchanged
        # image is the same deployment and the hook stays idempotent.
        version = digest.removeprefix("sha256:")[:12] if digest else None
    if version is None:
        raise ImageInspectionError("set --version; it cannot be derived from a remote image")
    return client.finalize_deployment(
        {
            "project": project,
            "version": version,
            "image": image,
            "tasks": tasks,
            "workload_type": workload_type.value,
        }
    )


def deploy(
    image: Annotated[
        str, typer.Argument(help="Image reference NAME:TAG, built with vmflow image build.")
    ],
    project: Annotated[
        str, typer.Option(help="Project slug; created on first deploy.")
    ] = "default",
    version: Annotated[
        str | None,
        typer.Option(help="Deployment version; defaults to the image's content digest."),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(help="Task id the image defines; repeat it. Read from the image by default."),
    ] = None,
    workload_type: Annotated[
        WorkloadType,
        typer.Option(help="Workload type of a new project; MICROVM pre-warms a template."),
    ] = WorkloadType.MICROVM,
    wait: Annotated[bool, typer.Option(help="Wait until the deployment is DEPLOYED.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most.")] = 300,
) -> None:
    """Deploy a built image: record it and start its template rollout."""
    with exit_on_api_error(), ApiClient.from_environment() as client:
        try:
            deployment = deploy_image(
                client,
                image,
                project=project,
                version=version,
                tasks=task,
                workload_type=workload_type,
            )
        except ImageInspectionError as error:
            error_console.print(f"[red]error:[/] {error}")
            raise typer.Exit(1) from None
        console.print(
            f"deployment [bold]{deployment['id']}[/] of {deployment['project']} "
            f"version {deployment['version']}: {', '.join(deployment['tasks'])}"
        )
        if not wait:
            return
        try:
            deployment = wait_for_deployment(client, deployment["id"], timeout_s=timeout)
        except TimeoutError as error:
            error_console.print(f"[red]error:[/] {error}")
            raise typer.Exit(1) from None

    if deployment["status"] == DeploymentStatus.FAILED.value:
        error_console.print(
            f"[red]deployment failed:[/] {deployment['error_name']}: {deployment['error_message']}"
        )
        raise typer.Exit(1)
    console.print(
        f"[green]DEPLOYED[/] template mode {deployment['template_mode']}"
        + (f", template {deployment['template_id']}" if deployment["template_id"] else "")
    )
    console.print(
        f"`vmflow trigger TASK --project {deployment['project']}` runs on the project's newest "
        f"deployment, now {deployment['id']}; after another deploy to {deployment['project']}, "
        f"pass `--deployment {deployment['id']}` to run on this one or deploy it again",
        soft_wrap=True,
    )
