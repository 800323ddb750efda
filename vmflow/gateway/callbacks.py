"""Signed callbacks to the URL a background request named."""

from __future__ import annotations

import asyncio
import logging

import httpx
from pydantic import BaseModel

from vmflow.compute.signing import SIGNATURE_HEADER, sign

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 4
FIRST_BACKOFF_S = 0.5


class CallbackSender:
    """Posts callbacks signed with the gateway's callback secret, retrying transient failures."""

    def __init__(
        self,
        secret: str,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._secret = secret
        self._http = httpx.AsyncClient(timeout=timeout_s, transport=transport)

    async def send(self, url: str, payload: BaseModel, *, context: str) -> bool:
        """Post `payload` to `url`; return whether the receiver accepted it (2xx).

        Transport errors and 5xx responses are retried MAX_ATTEMPTS times with doubling
        backoff; a 4xx is final because the same body would be rejected again.
        """
        body = payload.model_dump_json(exclude_none=True).encode()
        backoff = FIRST_BACKOFF_S
        for attempt in range(1, MAX_ATTEMPTS + 1):
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(body, self._secret),
            }
            try:
                response = await self._http.post(url, content=body, headers=headers)
            except httpx.HTTPError as error:
                failure = repr(error)
            else:
                if response.is_success:
                    logger.info("callback for %s delivered to %s", context, url)
                    return True
                failure = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code < 500:
                    logger.error("callback for %s to %s rejected: %s", context, url, failure)
                    return False
            if attempt < MAX_ATTEMPTS:
                logger.warning(
                    "callback for %s to %s failed (attempt %d of %d): %s; retrying in %.1f s",
                    context, url, attempt, MAX_ATTEMPTS, failure, backoff,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff *= 2
        logger.error(
            "callback for %s to %s failed %d times: %s", context, url, MAX_ATTEMPTS, failure
        )
        return False

    async def aclose(self) -> None:
        await self._http.aclose()
