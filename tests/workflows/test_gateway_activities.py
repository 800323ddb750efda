"""Gateway errors as Temporal sees them: retryable or not, with the HTTP status."""

from __future__ import annotations

import pytest

from activities.gateway import to_application_error
from vmflow.compute import ComputeConnectionError, ComputeHTTPError, ComputeResponseError

URL = "http://127.0.0.1:9/api/instances"


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),
        (404, False),
        (409, False),
        (422, False),
        (408, True),
        (429, True),
        (500, True),
        (503, True),
    ],
)
def test_gateway_http_error_retry_by_status(status: int, retryable: bool) -> None:
    error = ComputeHTTPError(f"POST {URL} returned {status}", url=URL, status=status, body="")

    failure = to_application_error(error)

    assert failure.non_retryable is (not retryable)
    assert failure.type == "ComputeHTTPError"
    assert failure.details == (status,)


def test_gateway_connection_error_is_retried() -> None:
    failure = to_application_error(ComputeConnectionError("refused", url=URL))

    assert failure.non_retryable is False
    assert failure.type == "ComputeConnectionError"


def test_gateway_malformed_response_is_not_retried() -> None:
    error = ComputeResponseError("not an Instance", url=URL, status=200, body="{}")

    assert to_application_error(error).non_retryable is True
