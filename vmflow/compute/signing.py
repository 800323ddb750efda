"""HMAC-SHA256 signatures on gateway callbacks.

The gateway sends `X-Vmflow-Signature: t=<unix seconds>,v1=<hex digest>`, the
digest taken over `<t>.<raw body>`; the receiver recomputes it and rejects a
timestamp older than its tolerance, so a captured callback cannot be replayed
later.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Vmflow-Signature"
DEFAULT_TOLERANCE_S = 300


class SignatureError(ValueError):
    """The signature header is missing, malformed, stale or does not match the body."""


def sign(body: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """Return the signature header value for `body`."""
    issued = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{issued}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={issued},v1={digest}"


def verify(
    body: bytes,
    header: str | None,
    secret: str,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Raise `SignatureError` unless `header` signs `body` with `secret` within the tolerance."""
    if not header:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    issued_text, digest = fields.get("t", ""), fields.get("v1", "")
    if not issued_text.isdigit() or not digest:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header; expected t=<unix>,v1=<hex>")
    issued = int(issued_text)
    current = time.time() if now is None else now
    if abs(current - issued) > tolerance_s:
        raise SignatureError(f"signature timestamp {issued} is outside {tolerance_s} s of now")
    expected = sign(body, secret, timestamp=issued).split("v1=", 1)[1]
    if not hmac.compare_digest(expected, digest):
        raise SignatureError("signature does not match the body")
