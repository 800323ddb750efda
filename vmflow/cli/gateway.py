"""`vmflow gateway serve`: run the reference compute gateway on this machine."""

from __future__ import annotations

import logging

import typer

from vmflow.config import ConfigError

app = typer.Typer(help="Run the reference compute gateway.", no_args_is_help=True)


@app.command()
def serve(
    host: str | None = typer.Option(
        None, help="Address to bind; default VMFLOW_GATEWAY_HOST or 127.0.0.1."
    ),
    port: int | None = typer.Option(None, help="TCP port; default VMFLOW_GATEWAY_PORT or 8020."),
    delete_instances_on_exit: bool | None = typer.Option(
        None,
        "--delete-instances-on-exit",
        help="Delete every instance when the gateway stops (snapshots stay); default "
        "VMFLOW_GATEWAY_DELETE_INSTANCES_ON_EXIT or false, which keeps instances running.",
    ),
) -> None:
    """Serve the gateway API until interrupted; needs root for the sandbox driver."""
    from vmflow.gateway.server import serve as serve_gateway
    from vmflow.gateway.settings import load_gateway_settings

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if delete_instances_on_exit:
        overrides["delete_instances_on_exit"] = True
    try:
        settings = load_gateway_settings(**overrides)
        serve_gateway(settings)
    except ConfigError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
