"""Entry point of the `vmflow` console script; each command group lives in its own module."""

from __future__ import annotations

import typer

from vmflow import __version__
from vmflow.cli import api, db, demo, deploy, dev, gateway, image, runs

app = typer.Typer(
    name="vmflow",
    help="Run background tasks on dedicated compute instances, orchestrated by Temporal.",
    no_args_is_help=True,
)


app.add_typer(db.app, name="db")
app.add_typer(gateway.app, name="gateway")
app.add_typer(image.app, name="image")
app.add_typer(api.app, name="api")
app.command()(deploy.deploy)
app.command()(runs.trigger)
app.command()(dev.dev)
app.command()(demo.demo)
app.add_typer(runs.runs_app, name="runs")
app.add_typer(runs.waitpoint_app, name="waitpoint")


@app.command()
def version() -> None:
    """Print vmflow's version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
