"""Client of the compute gateway API: instances, templates and snapshots."""

from vmflow.compute.client import ComputeClient
from vmflow.compute.errors import (
    ComputeConnectionError,
    ComputeError,
    ComputeHTTPError,
    ComputeResponseError,
    ComputeTimeoutError,
)
from vmflow.compute.images import InvalidImageReferenceError, strip_image_digest

__all__ = [
    "ComputeClient",
    "ComputeConnectionError",
    "ComputeError",
    "ComputeHTTPError",
    "ComputeResponseError",
    "ComputeTimeoutError",
    "InvalidImageReferenceError",
    "strip_image_digest",
]
