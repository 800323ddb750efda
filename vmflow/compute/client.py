"""Async client of the compute gateway API, on one pooled httpx connection set."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from opentelemetry import propagate
from pydantic import BaseModel, ValidationError

from vmflow.compute.errors import (
    ComputeConnectionError,
    ComputeError,
    ComputeHTTPError,
    ComputeResponseError,
    ComputeTimeoutError,
)
from vmflow.compute.models import (
    Health,
    Instance,
    InstanceCreateRequest,
    InstanceCreateResponse,
    Snapshot,
    SnapshotAccepted,
    SnapshotRequest,
    SnapshotRestoreRequest,
    SnapshotRestoreResponse,
    TemplateCreateRequest,
    TemplateCreateResponse,
)

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

# Gateway error bodies are echoed into exceptions; this bounds their size.
_MAX_ERROR_BODY = 4096


async def _inject_trace_context(request: httpx.Request) -> None:
    """Add the current trace context (`traceparent`, `tracestate`) to an outgoing request."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    request.headers.update(carrier)


class ComputeClient:
    """Client of one compute gateway; use it as an async context manager or call `aclose()`."""

    def __init__(
        self,
        base_url: str,
        *,
        auth_token: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/json"}
        if auth_token:
            headers["Authorization"] = f"Bearer {auth_token}"
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            event_hooks={"request": [_inject_trace_context]},
        )
        self.instances = InstancesAPI(self)
        self.templates = TemplatesAPI(self)
        self.snapshots = SnapshotsAPI(self)

    @classmethod
    def from_settings(cls, settings: Any) -> ComputeClient:
        """Build a client from `vmflow.config.Settings`; raises if no gateway URL is set."""
        if settings.COMPUTE_GATEWAY_URL is None:
            raise ValueError("COMPUTE_GATEWAY_URL is not set; set it to the gateway's base URL")
        token = settings.COMPUTE_GATEWAY_AUTH_TOKEN
        return cls(
            str(settings.COMPUTE_GATEWAY_URL),
            auth_token=token.get_secret_value() if token else None,
            timeout_s=settings.gateway_timeout_s,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self) -> Health:
        return await self.request_model("GET", "/healthz", Health)

    async def request(
        self, method: str, path: str, body: BaseModel | None = None
    ) -> httpx.Response:
        """Send one request; return the response on 2xx and raise a `ComputeError` otherwise."""
        content = None if body is None else body.model_dump_json(by_alias=True, exclude_none=True)
        headers = {"Content-Type": "application/json"} if content is not None else None
        request = self._http.build_request(method, path, content=content, headers=headers)
        url = str(request.url)
        try:
            response = await self._http.send(request)
        except httpx.TimeoutException as error:
            raise ComputeTimeoutError(
                f"{method} {url} timed out after {self._http.timeout.read} s; "
                "raise COMPUTE_GATEWAY_TIMEOUT_MS if the gateway is slow",
                url=url,
            ) from error
        except httpx.TransportError as error:
            raise ComputeConnectionError(
                f"{method} {url} failed to connect: {error!r}; check that the gateway runs "
                "and COMPUTE_GATEWAY_URL points at it",
                url=url,
            ) from error

        if response.is_success:
            return response
        text = response.text[:_MAX_ERROR_BODY]
        raise ComputeHTTPError(
            f"{method} {url} returned {response.status_code}: {text or '<empty body>'}",
            url=url,
            status=response.status_code,
            body=text,
        )

    async def request_model(
        self, method: str, path: str, model: type[ModelT], body: BaseModel | None = None
    ) -> ModelT:
        response = await self.request(method, path, body)
        return self._parse(response, model)

    async def request_optional_model(
        self, method: str, path: str, model: type[ModelT], body: BaseModel | None = None
    ) -> ModelT | None:
        """Like `request_model`, but 202 and 204 (or an empty body) are success with no result."""
        response = await self.request(method, path, body)
        if response.status_code in (202, 204) or not response.content:
            return None
        return self._parse(response, model)

    @staticmethod
    def _parse(response: httpx.Response, model: type[ModelT]) -> ModelT:
        url = str(response.request.url)
        try:
            return model.model_validate_json(response.content)
        except ValidationError as error:
            raise ComputeResponseError(
                f"{response.request.method} {url} returned a body that is not a valid "
                f"{model.__name__}: {error}",
                url=url,
                status=response.status_code,
                body=response.text[:_MAX_ERROR_BODY],
            ) from error


class InstancesAPI:
    def __init__(self, client: ComputeClient) -> None:
        self._client = client

    async def create(self, request: InstanceCreateRequest) -> InstanceCreateResponse:
        return await self._client.request_model(
            "POST", "/api/instances", InstanceCreateResponse, request
        )

    async def get(self, instance_id: str) -> Instance:
        return await self._client.request_model("GET", f"/api/instances/{instance_id}", Instance)

    async def delete(self, instance_id: str) -> None:
        await self._client.request("DELETE", f"/api/instances/{instance_id}")

    async def snapshot(self, instance_id: str, request: SnapshotRequest) -> SnapshotAccepted | None:
        """Ask for a snapshot; the gateway returns 202 and reports through the callback.

        Returns the 202 body when it is a JSON object (the reference gateway
        sends the new snapshot's id), else None.
        """
        response = await self._client.request(
            "POST", f"/api/instances/{instance_id}/snapshot", request
        )
        if not response.content:
            return None
        try:
            return self._client._parse(response, SnapshotAccepted)
        except ComputeResponseError:
            return None


class TemplatesAPI:
    def __init__(self, client: ComputeClient) -> None:
        self._client = client

    async def create(self, request: TemplateCreateRequest) -> TemplateCreateResponse | None:
        """Build a template; background builds return 202, so this returns None for them."""
        return await self._client.request_optional_model(
            "POST", "/api/templates", TemplateCreateResponse, request
        )


class SnapshotsAPI:
    def __init__(self, client: ComputeClient) -> None:
        self._client = client

    async def restore(
        self, snapshot_id: str, request: SnapshotRestoreRequest
    ) -> SnapshotRestoreResponse | None:
        return await self._client.request_optional_model(
            "POST", f"/api/snapshots/{snapshot_id}/restore", SnapshotRestoreResponse, request
        )

    async def get(self, snapshot_id: str) -> Snapshot:
        return await self._client.request_model("GET", f"/api/snapshots/{snapshot_id}", Snapshot)

    async def delete(self, snapshot_id: str) -> None:
        await self._client.request("DELETE", f"/api/snapshots/{snapshot_id}")


__all__ = ["ComputeClient", "ComputeError"]
