"""The gateway's HTTP service: FastAPI routes over `Gateway`, bearer auth and a body limit.

`create_app(settings)` builds the application; `serve()` runs it with uvicorn. Tests can
run it in-process with `GatewayServer` (see `vmflow.gateway.server`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmflow.compute.models import (
    Health,
    Instance,
    InstanceCreateRequest,
    Snapshot,
    SnapshotRequest,
    SnapshotRestoreRequest,
    TemplateCreateRequest,
    TemplateCreateResponse,
)
from vmflow.config import ConfigError
from vmflow.gateway.callbacks import CallbackSender
from vmflow.gateway.drivers.base import Driver
from vmflow.gateway.errors import GatewayError
from vmflow.gateway.service import Gateway
from vmflow.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """Rejects request bodies over `max_bytes` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return

        received = 0
        started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not rejected:
                    # Send the 413 now, and pass the app a disconnect so it stops reading.
                    rejected = True
                    if not started:
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, tracking_send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {"detail": f"request body is larger than the limit of {self.max_bytes} bytes"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class BearerAuthMiddleware:
    """Requires `Authorization: Bearer <token>` on every HTTP request."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            presented = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(presented, self.expected):
                reason = "missing" if not presented else "invalid"
                body = json.dumps(
                    {"detail": f"{reason} bearer token; send Authorization: Bearer <token> "
                     "with the gateway's VMFLOW_GATEWAY_AUTH_TOKEN"}
                ).encode()  # fmt: skip
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def build_gateway(settings: GatewaySettings, driver: Driver | None = None) -> Gateway:
    """Check the settings the service needs and build its `Gateway` (sandbox driver by default)."""
    if settings.auth_token is None or not settings.auth_token.get_secret_value():
        raise ConfigError("VMFLOW_GATEWAY_AUTH_TOKEN is not set; set it to the API's bearer token")
    if settings.callback_secret is None or not settings.callback_secret.get_secret_value():
        raise ConfigError(
            "VMFLOW_GATEWAY_CALLBACK_SECRET is not set; set it to the key callbacks are signed with"
        )
    if driver is None:
        from vmflow.gateway.drivers.sandbox import SandboxDriver

        driver = SandboxDriver(settings)
    callbacks = CallbackSender(
        settings.callback_secret.get_secret_value(), timeout_s=settings.callback_timeout_s
    )
    return Gateway(settings, driver, callbacks)


def create_app(settings: GatewaySettings, *, gateway: Gateway | None = None) -> FastAPI:
    """Build the gateway's FastAPI application; its lifespan starts and closes the gateway."""
    service = gateway or build_gateway(settings)
    assert settings.auth_token is not None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        title="vmflow compute gateway",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.gateway = service

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        if error.status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, error)
        else:
            logger.info(
                "%s %s rejected (%d): %s", request.method, request.url.path, error.status, error
            )
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return service.health()

    @app.post(
        "/api/templates",
        response_model=TemplateCreateResponse,
        response_model_exclude_none=True,
        responses={202: {"description": "Background build accepted; the callback reports it."}},
    )
    async def create_template(request: TemplateCreateRequest) -> Any:
        template, task = await service.create_template(request)
        if request.background:
            return JSONResponse(
                {"template_id": template.id, "image": template.image, "status": "building"},
                status_code=202,
            )
        # Shielded, so a client that disconnects does not leave a half-built template.
        finished = await asyncio.shield(task)
        return service.template_response(finished)

    @app.get("/api/templates/{template_id}", response_model=TemplateCreateResponse)
    async def get_template(template_id: str) -> TemplateCreateResponse:
        return service.template_response(service.get_template(template_id))

    @app.post("/api/instances")
    async def create_instance(request: InstanceCreateRequest) -> JSONResponse:
        response = await service.create_instance(request)
        return JSONResponse(response.model_dump(by_alias=True, exclude_none=True))

    @app.get("/api/instances", response_model=list[Instance])
    async def list_instances() -> list[Instance]:
        return service.list_instances()

    @app.get("/api/instances/{instance_id}", response_model=Instance)
    async def get_instance(instance_id: str) -> Instance:
        return service.get_instance(instance_id)

    @app.get("/api/instances/{instance_id}/logs", response_class=PlainTextResponse)
    async def instance_logs(
        instance_id: str,
        tail_bytes: int | None = Query(default=None, ge=1, description="Only the last N bytes."),
    ) -> Response:
        output = service.instance_output(instance_id, tail_bytes)
        return Response(output, media_type="text/plain; charset=utf-8")

    @app.delete("/api/instances/{instance_id}", status_code=204)
    async def delete_instance(instance_id: str) -> Response:
        await service.delete_instance(instance_id)
        return Response(status_code=204)

    @app.post("/api/instances/{instance_id}/snapshot", status_code=202)
    async def snapshot_instance(instance_id: str, request: SnapshotRequest) -> dict[str, str]:
        snapshot = service.request_snapshot(instance_id, request.callback)
        return {"snapshot_id": snapshot.id, "instance_id": instance_id, "status": "pending"}

    @app.get("/api/snapshots/{snapshot_id}", response_model=Snapshot)
    async def get_snapshot(snapshot_id: str) -> Snapshot:
        return service.get_snapshot(snapshot_id)

    @app.delete("/api/snapshots/{snapshot_id}", status_code=204)
    async def delete_snapshot(snapshot_id: str) -> Response:
        await service.delete_snapshot(snapshot_id)
        return Response(status_code=204)

    @app.post("/api/snapshots/{snapshot_id}/restore")
    async def restore_snapshot(snapshot_id: str, request: SnapshotRestoreRequest) -> JSONResponse:
        response = await service.restore_snapshot(snapshot_id, request)
        return JSONResponse(response.model_dump(by_alias=True, exclude_none=True))

    app.add_middleware(BearerAuthMiddleware, token=settings.auth_token.get_secret_value())
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    return app
