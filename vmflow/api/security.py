"""Credentials of the supervisor API: the platform API key and gateway callback signatures.

Platform routes take `Authorization: Bearer <VMFLOW_API_KEY>`. Gateway
callbacks carry an HMAC signature over the raw body (`vmflow.compute.signing`).
A missing credential and a wrong one get the same 401 response, so a caller
cannot tell which routes exist or which keys are close. Credentials are never
logged; failures log the route and the client address only.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from vmflow.compute.signing import SIGNATURE_HEADER, SignatureError, verify
from vmflow.config import Settings

logger = logging.getLogger(__name__)

API_KEY_REALM = "vmflow-api"

# auto_error=False: a missing header must produce the same 401 as a wrong key,
# not FastAPI's default 403 "Not authenticated".
_bearer = HTTPBearer(auto_error=False, description="The platform API key (VMFLOW_API_KEY).")


class MissingSecretError(RuntimeError):
    """A secret the API needs (API key, workload or callback secret) is not configured."""


def require_secret(settings: Settings, name: str) -> str:
    """Return the secret setting `name`, raising `MissingSecretError` when it is unset or empty."""
    value = getattr(settings, name)
    secret = value.get_secret_value() if value is not None else ""
    if not secret:
        raise MissingSecretError(
            f"{name} is not set; set it in the environment (vmflow dev generates one "
            "into its data directory)"
        )
    return secret


def unauthorized(detail: str = "invalid or missing API key") -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": f'Bearer realm="{API_KEY_REALM}"'},
    )


def _client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Reject the request with 401 unless it carries the platform API key as a bearer token."""
    expected: str = request.app.state.api_key
    presented = credentials.credentials if credentials is not None else ""
    # compare_digest on equal-typed bytes takes time independent of where they differ.
    if not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
        logger.warning(
            "rejected request without a valid API key: %s %s from %s",
            request.method,
            request.url.path,
            _client_address(request),
        )
        raise unauthorized()


async def verified_callback_body(request: Request) -> bytes:
    """Return the raw body of a gateway callback after checking its signature, else raise 401."""
    body = await request.body()
    secret: str = request.app.state.callback_secret
    try:
        verify(body, request.headers.get(SIGNATURE_HEADER), secret)
    except SignatureError as error:
        logger.warning(
            "rejected gateway callback %s from %s: %s",
            request.url.path,
            _client_address(request),
            error,
        )
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail=f"invalid callback signature: {error}",
        ) from error
    return body


ApiKey = Depends(require_api_key)
