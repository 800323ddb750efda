"""Errors of the gateway; CRIU, subprocess and errno errors are translated into these."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises; `status` is the HTTP status the API returns."""

    status = 500


class InvalidRequestError(GatewayError):
    """The request is well-formed but requests limits this gateway does not allow."""

    status = 422


class NotFoundError(GatewayError):
    """An image, instance, snapshot or template does not exist."""

    status = 404


class ConflictError(GatewayError):
    """The target is in a state that does not allow the operation."""

    status = 409


class SandboxError(GatewayError):
    """Starting, limiting or stopping a sandbox failed."""


class CriuError(GatewayError):
    """A CRIU dump or restore failed; `log_path` names CRIU's log for the details."""

    def __init__(self, message: str, *, log_path: str | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class SnapshotsUnavailableError(GatewayError):
    """The driver cannot take snapshots on this host, for example because CRIU 4 is missing."""

    status = 501


class ImageError(GatewayError):
    """An image directory or manifest is invalid."""

    status = 422
