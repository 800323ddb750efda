"""`vmflow image build|list`: the local image store the gateway runs instances from."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from vmflow.gateway.images import ImageStore

app = typer.Typer(
    help="Build and list images in the gateway's local image store.", no_args_is_help=True
)


def _store() -> ImageStore:
    from vmflow.gateway.images import ImageStore
    from vmflow.gateway.settings import load_gateway_settings

    return ImageStore(load_gateway_settings().image_dir)


@app.command()
def build(
    directory: Annotated[
        Path,
        typer.Argument(
            exists=True, file_okay=False, help="Task project directory with vmflow.toml."
        ),
    ],
    tag: Annotated[str, typer.Option("--tag", "-t", help="Image reference NAME:TAG to build.")],
) -> None:
    """Copy a task project directory into the image store under NAME:TAG."""
    from vmflow.gateway.errors import ImageError

    try:
        manifest = _store().build(directory, tag)
    except ImageError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{manifest.reference} {manifest.digest}")


@app.command("list")
def list_images() -> None:
    """List the images in the store: reference, digest, tasks and creation time."""
    for manifest in _store().list():
        typer.echo(
            f"{manifest.reference}\t{manifest.digest}\t{','.join(manifest.tasks)}\t{manifest.created_at}"
        )
