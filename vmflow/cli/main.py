"""Entry point of the `vmflow` console script; each command group lives in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="vmflow",
    help="Run background tasks on dedicated compute instances, orchestrated by Temporal.",
    no_args_is_help=True,
)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
