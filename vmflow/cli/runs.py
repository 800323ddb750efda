"""`vmflow trigger`, `vmflow runs get|list|logs|cancel` and `vmflow waitpoint complete`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vmflow.cli.client import ApiClient, ApiClientError
from vmflow.cli.common import (
    clock,
    console,
    error_console,
    exit_on_api_error,
    parse_json_option,
    poll_until,
)
from vmflow.storage.models import TaskRunStatus, WaitpointKind, WaitpointStatus

runs_app = typer.Typer(help="Inspect and cancel runs.", no_args_is_help=True)
waitpoint_app = typer.Typer(help="Resolve waitpoints.", no_args_is_help=True)

LOG_FOLLOW_INTERVAL_S = 0.5
FINAL_STATUSES = frozenset(status.value for status in TaskRunStatus if status.is_final)


def run_watcher(emit: Callable[[str], None]) -> Callable[[dict[str, Any]], None]:
    """Return a callback that reports each new status, waitpoint and checkpoint of a run once."""
    seen: set[str] = set()

    def report(run: dict[str, Any]) -> None:
        status_key = f"status:{run['status']}"
        if status_key not in seen:
            seen.add(status_key)
            emit(f"{clock(run['updated_at'])}  status [bold]{run['status']}[/]")
        for waitpoint in run["waitpoints"]:
            key = f"waitpoint:{waitpoint['id']}:{waitpoint['status']}"
            if key not in seen:
                seen.add(key)
                emit(
                    f"{clock(waitpoint['completed_at'] or waitpoint['created_at'])}  "
                    f"{waitpoint['kind']} waitpoint {waitpoint['id']} {waitpoint['status']}"
                )
        for checkpoint in run["checkpoints"]:
            key = f"checkpoint:{checkpoint['id']}"
            if key not in seen:
                seen.add(key)
                emit(
                    f"{clock(checkpoint['created_at'])}  {checkpoint['type']} checkpoint "
                    f"{checkpoint['location']}"
                )

    return report


def token_hinter(emit: Callable[[str], None]) -> Callable[[dict[str, Any]], None]:
    """Return a callback that prints, once per pending token, the command that completes it."""
    hinted: set[str] = set()

    def hint(run: dict[str, Any]) -> None:
        for waitpoint in run["waitpoints"]:
            pending_token = (
                waitpoint["kind"] == WaitpointKind.TOKEN.value
                and waitpoint["status"] == WaitpointStatus.PENDING.value
            )
            if pending_token and waitpoint["id"] not in hinted:
                hinted.add(waitpoint["id"])
                emit(
                    f"run {run['id']} waits for token {waitpoint['id']}; this command keeps "
                    "waiting, so complete the token from another shell with:\n"
                    f"  vmflow waitpoint complete {waitpoint['id']} --output '{{...}}'"
                )

    return hint


def print_run(run: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for field in (
        "id",
        "task_id",
        "status",
        "deployment_id",
        "workflow_id",
        "attempt",
        "instance_id",
        "created_at",
        "started_at",
        "finished_at",
    ):
        table.add_row(field, str(run.get(field) if run.get(field) is not None else "-"))
    table.add_row("payload", json.dumps(run.get("payload")))
    if run.get("output") is not None:
        table.add_row("output", json.dumps(run["output"], indent=2))
    if run.get("error"):
        table.add_row("error", Text(f"{run['error'].get('name')}: {run['error'].get('message')}"))
    for waitpoint in run.get("waitpoints", []):
        table.add_row("waitpoint", f"{waitpoint['id']} {waitpoint['kind']} {waitpoint['status']}")
    for checkpoint in run.get("checkpoints", []):
        table.add_row("checkpoint", f"{checkpoint['type']} {checkpoint['location']}")
    console.print(table)
    if run.get("error"):
        print_traceback(console, run["error"])


def print_traceback(target: Console, error: dict[str, Any]) -> None:
    """Print the task's traceback dimmed, when the run's error has one."""
    traceback = error.get("traceback")
    if traceback:
        target.print(Text(str(traceback).rstrip(), style="dim"))


def trigger(
    task_id: Annotated[str, typer.Argument(help="Id of the task to run.")],
    payload: Annotated[str | None, typer.Option(help="JSON value passed to the task.")] = None,
    project: Annotated[str, typer.Option(help="Run on this project's newest deployment.")] = (
        "default"
    ),
    deployment: Annotated[
        str | None, typer.Option(help="Run on this deployment instead of the project's newest.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="A second trigger with this key returns the first run.")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Show the run's state changes until it finishes.")
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds --wait waits at most; the run goes on after the CLI stops waiting."
        ),
    ] = 3600,
) -> None:
    """Trigger a run of a task."""
    body: dict[str, Any] = {"payload": parse_json_option(payload, "--payload")}
    if deployment:
        body["deployment_id"] = deployment
    else:
        body["project"] = project
    if idempotency_key:
        body["idempotency_key"] = idempotency_key

    with exit_on_api_error(), ApiClient.from_environment() as client:
        try:
            triggered = client.trigger(task_id, body)
        except ApiClientError as error:
            if error.error != "task_not_found" or deployment:
                raise
            raise ApiClientError(
                f"{error}; a trigger by project runs on the project's newest deployment, so "
                f"pass --deployment DEPLOYMENT_ID to run a task of an older deployment of "
                f"{project}, deploy that image again, or deploy each image to its own --project",
                status=error.status,
                error=error.error,
            ) from error
        console.print(f"run [bold]{triggered['run_id']}[/] ({triggered['workflow_id']})")
        if not wait:
            return
        watch = run_watcher(console.print)
        # Not wrapped, so the printed command can be copied as one line.
        hint = token_hinter(lambda line: console.print(line, soft_wrap=True))

        def report(run: dict[str, Any]) -> None:
            watch(run)
            hint(run)

        try:
            run = poll_until(
                lambda: client.get_run(triggered["run_id"]),
                lambda run: run["status"] in FINAL_STATUSES,
                timeout_s=timeout,
                on_value=report,
                what=f"run {triggered['run_id']} finishing",
            )
        except TimeoutError as error:
            error_console.print(f"[red]error:[/] {error}")
            raise typer.Exit(1) from None

    if run.get("output") is not None:
        console.print_json(json.dumps(run["output"]))
    if run["status"] != TaskRunStatus.COMPLETED.value:
        if run.get("error"):
            error_console.print(
                f"[red]{run['status']}:[/] {escape(str(run['error'].get('name')))}: "
                f"{escape(str(run['error'].get('message')))}"
            )
            print_traceback(error_console, run["error"])
        raise typer.Exit(1)


@runs_app.command("get")
def get_run(run_id: Annotated[str, typer.Argument(help="Run id.")]) -> None:
    """Show a run with its waitpoints and checkpoints."""
    with exit_on_api_error(), ApiClient.from_environment() as client:
        print_run(client.get_run(run_id))


@runs_app.command("list")
def list_runs(
    status: Annotated[TaskRunStatus | None, typer.Option(help="Only runs in this status.")] = None,
    task: Annotated[str | None, typer.Option(help="Only runs of this task.")] = None,
    deployment: Annotated[str | None, typer.Option(help="Only runs of this deployment.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Runs to show.")] = 20,
) -> None:
    """List runs, newest first: a table on a terminal, else one tab-separated line per run.

    Each line has the run id, task, status, creation and finish time.
    """
    with exit_on_api_error(), ApiClient.from_environment() as client:
        page = client.list_runs(
            status=status.value if status else None,
            task_id=task,
            deployment_id=deployment,
            limit=limit,
        )
    if console.is_terminal:
        console.print(runs_table(page["runs"]))
        return
    for run in page["runs"]:
        fields = (run["id"], run["task_id"], run["status"], run["created_at"], run["finished_at"])
        typer.echo("\t".join(field or "-" for field in fields))


def runs_table(runs: list[dict[str, Any]]) -> Table:
    """Return a table of runs whose ids stay on one line, so they can be copied.

    The other columns fold onto further lines when the terminal is narrow.
    """
    table = Table()
    id_width = max((len(run["id"]) for run in runs), default=0)
    table.add_column("run", no_wrap=True, min_width=id_width)
    for header in ("task", "status", "created", "finished"):
        table.add_column(header, overflow="fold")
    for run in runs:
        table.add_row(
            run["id"], run["task_id"], run["status"], run["created_at"], run["finished_at"] or "-"
        )
    return table


@runs_app.command("logs")
def run_logs(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    follow: Annotated[bool, typer.Option(help="Keep printing new lines until the run ends.")] = (
        False
    ),
) -> None:
    """Print a run's log lines."""
    with exit_on_api_error(), ApiClient.from_environment() as client:
        after = 0
        while True:
            page = client.run_logs(run_id, after=after)
            for line in page["lines"]:
                console.print(f"{clock(line['logged_at'])} {line['level']:<7} {line['message']}")
            if page["next_after"] is not None:
                after = page["next_after"]
                continue
            if not follow or client.get_run(run_id)["status"] in FINAL_STATUSES:
                return
            time.sleep(LOG_FOLLOW_INTERVAL_S)


@runs_app.command("cancel")
def cancel_run(run_id: Annotated[str, typer.Argument(help="Run id.")]) -> None:
    """Cancel a run that has not finished."""
    with exit_on_api_error(), ApiClient.from_environment() as client:
        run = client.cancel_run(run_id)
    console.print(f"cancellation requested for run {run['id']} (was {run['status']})")


@waitpoint_app.command("complete")
def complete_waitpoint(
    token_id: Annotated[str, typer.Argument(help="Id of the token waitpoint.")],
    output: Annotated[
        str | None, typer.Option(help="JSON value the waiting task resumes with.")
    ] = None,
) -> None:
    """Complete a token waitpoint so the waiting run resumes."""
    value = parse_json_option(output, "--output")
    with exit_on_api_error(), ApiClient.from_environment() as client:
        waitpoint = client.complete_token(token_id, value)
    console.print(f"completed token {waitpoint['id']} of run {waitpoint['run_id']}")
