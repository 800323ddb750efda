"""`vmflow api serve`: run the supervisor API with uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn
from opentelemetry import trace

from vmflow.api.app import create_app
from vmflow.api.limits import DEFAULT_MAX_BODY_BYTES
from vmflow.api.security import MissingSecretError
from vmflow.config import ConfigError, configure_logging, load_settings
from vmflow.telemetry import build_tracer_provider

app = typer.Typer(help="Run the supervisor API.", no_args_is_help=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to bind.")] = 8080,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body accepted, in bytes.")
    ] = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Serve the supervisor API until SIGINT or SIGTERM.

    Reads DATABASE_URL, TEMPORAL_ADDRESS, VMFLOW_API_KEY, VMFLOW_WORKLOAD_SECRET
    and VMFLOW_CALLBACK_SECRET from the environment.
    """
    configure_logging()
    try:
        settings = load_settings()
        if settings.OTEL_EXPORTER_OTLP_ENDPOINT is not None:
            trace.set_tracer_provider(
                build_tracer_provider(str(settings.OTEL_EXPORTER_OTLP_ENDPOINT))
            )
        application = create_app(settings, max_body_bytes=max_body_bytes)
    except (ConfigError, MissingSecretError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(application, host=host, port=port, log_level="info")
