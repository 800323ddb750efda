"""`vmflow dev`: run the whole stack on this machine until Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.table import Table

from vmflow.cli.common import console, error_console
from vmflow.cli.local import LocalStateError, secrets_path, stack_path
from vmflow.cli.stack import LocalStack, StackError, StackPorts
from vmflow.config import Settings, default_data_dir
from vmflow.storage.db import redact_url

# How often the foreground loop checks that every child still runs.
WATCH_INTERVAL_S = 0.5
# The delay the API gives each run when neither the option nor the variable sets one.
DEFAULT_SNAPSHOT_DELAY_MS = Settings.model_fields["COMPUTE_SNAPSHOT_DELAY_MS"].default

DataDirOption = Annotated[
    Path | None,
    typer.Option(help="Directory for the databases, secrets, images and logs.", show_default=False),
]
TemporalPortOption = Annotated[
    int, typer.Option(min=0, max=65535, help="Temporal gRPC port; 0 picks a free one.")
]
TemporalUiPortOption = Annotated[
    int, typer.Option(min=0, max=65535, help="Temporal UI port; 0 picks a free one.")
]
ApiPortOption = Annotated[
    int, typer.Option(min=0, max=65535, help="Supervisor API port; 0 picks a free one.")
]
GatewayPortOption = Annotated[
    int, typer.Option(min=0, max=65535, help="Gateway port; 0 picks a free one.")
]


def stack_table(stack: LocalStack, title: str = "vmflow dev") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("listens at")
    table.add_column("pid", justify="right")
    table.add_column("log")
    for component in stack.components:
        table.add_row(
            component.name,
            component.address,
            str(component.process.pid),
            str(component.log_path),
        )
    table.add_row("database", redact_url(stack.database_url), "-", "-")
    return table


def watch_until_a_part_exits(stack: LocalStack) -> None:
    """Block until a child of the stack exits, then report it and exit with status 1.

    Ctrl-C (KeyboardInterrupt) and SIGTERM (`Terminate`) interrupt the wait.
    """
    while True:
        failed = stack.failed_component()
        if failed is not None:
            error_console.print(
                f"[red]error:[/] {failed.name} exited with status "
                f"{failed.process.returncode}; its log {failed.log_path} ends with:\n"
                f"{failed.log_tail()}"
            )
            raise typer.Exit(1)
        time.sleep(WATCH_INTERVAL_S)


class Terminate(Exception):
    """Raised in the main thread when SIGTERM arrives, so the stack stops like on Ctrl-C."""


def raise_terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminate()


def dev(
    data_dir: DataDirOption = None,
    temporal_port: TemporalPortOption = 7233,
    temporal_ui_port: TemporalUiPortOption = 8233,
    api_port: ApiPortOption = 8080,
    gateway_port: GatewayPortOption = 8020,
    snapshot_delay_ms: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Milliseconds a suspended run waits before it is snapshotted.",
            show_default=f"COMPUTE_SNAPSHOT_DELAY_MS, else {DEFAULT_SNAPSHOT_DELAY_MS}",
        ),
    ] = None,
) -> None:
    """Start Temporal, the database, the gateway, the API and the worker; stop all on Ctrl-C."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    directory = data_dir or default_data_dir()
    environment = {}
    if snapshot_delay_ms is not None:
        environment["COMPUTE_SNAPSHOT_DELAY_MS"] = str(snapshot_delay_ms)
    stack = LocalStack(
        directory,
        StackPorts(temporal_port, temporal_ui_port, api_port, gateway_port),
        database_url=os.environ.get("DATABASE_URL"),
        environment=environment,
    )

    previous = signal.signal(signal.SIGTERM, raise_terminate)
    # A shell starts background jobs with SIGINT ignored, and Python then keeps
    # it ignored; Ctrl-C and `kill -INT` must stop the stack all the same.
    previous_interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with console.status("starting the local stack"):
            stack.start()
        console.print(stack_table(stack))
        console.print(
            f"API key in {secrets_path(directory)}, addresses in {stack_path(directory)}; "
            f"vmflow commands in other shells find both there (with VMFLOW_DATA_DIR={directory} "
            f"unless that is the default). API at VMFLOW_API_URL={stack.api_url}. "
            "Press Ctrl-C to stop."
        )
        # Flushed so that a pipe (a log collector, a test) receives the table now.
        sys.stdout.flush()
        watch_until_a_part_exits(stack)
    except (StackError, LocalStateError) as error:
        error_console.print(f"[red]error:[/] {error}")
        raise typer.Exit(1) from None
    except (KeyboardInterrupt, Terminate):
        console.print("stopping")
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_interrupt)
    console.print("stopped every part of the local stack")
