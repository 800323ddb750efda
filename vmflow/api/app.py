"""FastAPI factory of the supervisor API.

`create_app` mounts three kinds of routes, each behind its own credential:
the platform routes (API key), the runners' workload API (per-run workload
tokens) and the gateway's callbacks (HMAC signatures). The OpenAPI document
is at `GET /api/v1/openapi.json`, behind the API key. Only `GET /healthz` is
open, and it returns nothing but liveness.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.client import Client

from vmflow import __version__
from vmflow.api import callbacks, deployments, runs, waitpoint_routes
from vmflow.api.errors import ApiError, describe_validation_errors
from vmflow.api.limits import DEFAULT_MAX_BODY_BYTES, BodySizeLimitMiddleware
from vmflow.api.orchestration import Orchestrator
from vmflow.api.security import ApiKey, require_secret
from vmflow.api.temporal_events import TemporalRunEvents
from vmflow.api.workload import install_workload_api
from vmflow.config import Settings
from vmflow.storage.db import create_engine_from_url, session_factory
from vmflow.telemetry import temporal_tracing_interceptor
from workflows import contract

logger = logging.getLogger(__name__)

OPENAPI_PATH = "/api/v1/openapi.json"

_STATUS_ERRORS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


async def connect_temporal(settings: Settings) -> Client:
    """Connect to Temporal at TEMPORAL_ADDRESS, traced when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    interceptors: list[Any] = []
    if settings.OTEL_EXPORTER_OTLP_ENDPOINT is not None:
        interceptors.append(temporal_tracing_interceptor())
    # Lazy, so the API starts before Temporal does; requests made while
    # Temporal is unreachable get 503.
    return await Client.connect(
        settings.TEMPORAL_ADDRESS,
        namespace=settings.TEMPORAL_NAMESPACE,
        interceptors=interceptors,
        lazy=True,
    )


async def handle_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    items = list(error.errors())
    malformed = [item for item in items if item.get("type") == "json_invalid"]
    if malformed:
        item = malformed[0]
        reason = (item.get("ctx") or {}).get("error", "invalid JSON")
        position = item["loc"][-1] if item.get("loc") else "?"
        return JSONResponse(
            status_code=400,
            content={
                "error": "malformed_json",
                "detail": f"request body is not valid JSON: {reason} at character {position}",
            },
        )
    detail = describe_validation_errors(items)
    return JSONResponse(
        status_code=422,
        content={
            "error": "invalid_request",
            "detail": f"request is invalid: {detail}",
            "errors": [
                {"loc": list(item["loc"]), "msg": item["msg"], "type": item["type"]}
                for item in items
            ],
        },
    )


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    if error.status_code >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, error.detail)
    return JSONResponse(
        status_code=error.status_code, content={"error": error.error, "detail": error.detail}
    )


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    name = _STATUS_ERRORS.get(error.status_code) or HTTPStatus(error.status_code).phrase.lower()
    if isinstance(error.detail, dict):
        # The workload API's own shape, {"detail": {"code", "message"}}, which runners parse.
        return JSONResponse(
            status_code=error.status_code,
            content={"detail": error.detail},
            headers=getattr(error, "headers", None),
        )
    detail = error.detail
    if error.status_code == 404 and detail == "Not Found":
        detail = f"no route matches {request.method} {request.url.path}"
    elif error.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return JSONResponse(
        status_code=error.status_code,
        content={"error": name.replace(" ", "_"), "detail": detail},
        headers=getattr(error, "headers", None),
    )


def create_app(
    settings: Settings,
    *,
    temporal_client: Client | None = None,
    sessions: sessionmaker[Session] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    task_queue: str = contract.MAIN_TASK_QUEUE,
) -> FastAPI:
    """Build the supervisor API.

    Without `temporal_client` the app connects to TEMPORAL_ADDRESS when it
    starts; without `sessions` it opens DATABASE_URL. Workflows start on
    `task_queue`. Raises
    `MissingSecretError` when the API key, workload or callback secret is unset.
    """
    api_key = require_secret(settings, "VMFLOW_API_KEY")
    callback_secret = require_secret(settings, "VMFLOW_CALLBACK_SECRET")
    workload_secret = require_secret(settings, "VMFLOW_WORKLOAD_SECRET")

    owned_engine = None
    if sessions is None:
        owned_engine = create_engine_from_url(settings.DATABASE_URL)
        sessions = session_factory(owned_engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = temporal_client or await connect_temporal(settings)
        orchestrator = Orchestrator(client, settings, task_queue=task_queue)
        app.state.orchestrator = orchestrator
        # The workload routes read their events through this same object, so
        # filling it here connects them to Temporal.
        run_events.orchestrator = orchestrator
        logger.info(
            "supervisor API ready: Temporal at %s namespace %s",
            settings.TEMPORAL_ADDRESS,
            settings.TEMPORAL_NAMESPACE,
        )
        try:
            yield
        finally:
            if owned_engine is not None:
                owned_engine.dispose()

    app = FastAPI(
        title="vmflow supervisor API",
        version=__version__,
        description="Deploy tasks, trigger runs, resolve waitpoints, and serve the runners' "
        "workload API and the compute gateway's callbacks.",
        lifespan=lifespan,
        # The document and its viewers are served behind the API key below instead.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.api_key = api_key
    app.state.callback_secret = callback_secret
    app.state.session_factory = sessions

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    for router in (deployments.router, runs.router, waitpoint_routes.router):
        app.include_router(router, dependencies=[ApiKey])
    app.include_router(callbacks.router)
    run_events = TemporalRunEvents()
    install_workload_api(app, session_factory=sessions, events=run_events, secret=workload_secret)

    @app.get(
        OPENAPI_PATH,
        dependencies=[ApiKey],
        include_in_schema=False,
        summary="The OpenAPI document of this API",
    )
    async def openapi_document() -> dict[str, Any]:
        return app.openapi()

    @app.get("/healthz", tags=["health"], summary="Liveness of the API process")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
