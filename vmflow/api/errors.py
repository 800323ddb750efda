"""Errors of the supervisor API, each mapped to one HTTP status and a machine-readable name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError

T = TypeVar("T")


class ApiError(Exception):
    """Root of the errors the API's routes raise; the app turns each into a JSON 4xx or 5xx."""

    status_code = 400
    error = "bad_request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _NamedApiError(ApiError):
    """An API error whose machine-readable name each raise passes, such as run_not_found."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error


class NotFoundError(_NamedApiError):
    status_code = 404
    error = "not_found"


class ConflictError(_NamedApiError):
    status_code = 409
    error = "conflict"


class OrchestrationUnavailableError(ApiError):
    """Temporal cannot be reached, so nothing was started or signaled."""

    status_code = 503
    error = "orchestration_unavailable"


class InvalidRequestError(_NamedApiError):
    """The body parsed but a value in it cannot be used."""

    status_code = 422


def describe_validation_errors(items: Iterable[Mapping[str, Any]]) -> str:
    """Join pydantic's error items as `field.path: message`, naming the whole body `body`."""
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}" for item in items
    )


def retry_once_on_conflict(step: Callable[[], T]) -> T:
    """Run a database transaction, and run it once more if a unique constraint rejected it.

    Two requests that create the same project, deployment version or
    idempotency key at once both pass their existence checks, and one insert
    fails; the second attempt then finds the other request's row.
    """
    try:
        return step()
    except IntegrityError:
        return step()
