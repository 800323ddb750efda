"""Errors of the compute gateway client; every httpx error is translated here."""

from __future__ import annotations


class ComputeError(Exception):
    """Root of every error the compute client raises.

    `url` is the request URL. `status` and `body` are set when the gateway
    returned an HTTP error.
    """

    def __init__(
        self, message: str, *, url: str, status: int | None = None, body: str | None = None
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.body = body

    @property
    def retryable(self) -> bool:
        """Whether retrying the same request may succeed (transport errors, 408, 429, 5xx)."""
        return True


class ComputeTimeoutError(ComputeError):
    """The gateway did not respond within COMPUTE_GATEWAY_TIMEOUT_MS."""


class ComputeConnectionError(ComputeError):
    """The gateway could not be reached: connection refused, reset or unresolvable."""


class ComputeHTTPError(ComputeError):
    """The gateway returned a 4xx or 5xx status."""

    status: int

    @property
    def retryable(self) -> bool:
        return self.status in (408, 425, 429) or self.status >= 500


class ComputeResponseError(ComputeError):
    """The gateway answered 2xx with a body that does not match the API's schema."""

    @property
    def retryable(self) -> bool:
        return False
