"""Workload tokens: HMAC-SHA256 signed bearer tokens scoped to one run and deployment.

A token is `<claims>.<signature>`, both base64url without padding. The claims
are compact JSON `{"v": 1, "run_id", "deployment_id", "iat", "exp"}` with
times in Unix seconds. A token issued for one runner also has `"runner_id"`.
The signature is HMAC-SHA256 over the encoded claims
with VMFLOW_WORKLOAD_SECRET. The worker issues one per run and passes it to
the gateway, whose instance channel adds it to every proxied request, so the
runner itself never receives it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

TOKEN_VERSION = 1


class WorkloadTokenError(ValueError):
    """A workload token is malformed, wrongly signed, of another version, or expired."""


@dataclass(frozen=True)
class WorkloadClaims:
    """Claims of a valid workload token: access to one run of one deployment until `expires_at`."""

    run_id: str
    deployment_id: str
    issued_at: int
    expires_at: int
    # The one runner the token is for, or None for any runner of the run.
    runner_id: str | None = None


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def _sign(secret: str, encoded_claims: str) -> str:
    digest = hmac.new(secret.encode(), encoded_claims.encode("ascii"), hashlib.sha256).digest()
    return _b64encode(digest)


def issue_workload_token(
    secret: str,
    run_id: str,
    deployment_id: str,
    ttl_s: int,
    *,
    now: float | None = None,
    runner_id: str | None = None,
) -> str:
    """Issue a token for `run_id` of `deployment_id` that expires `ttl_s` seconds from now.

    With `runner_id`, the workload API accepts the token only in requests of
    that runner.
    """
    if not secret:
        raise ValueError("workload secret is empty; set VMFLOW_WORKLOAD_SECRET")
    if not run_id or not deployment_id:
        raise ValueError(
            f"run_id and deployment_id must be non-empty, got {run_id!r} and {deployment_id!r}"
        )
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")

    issued_at = int(time.time() if now is None else now)
    claims = {
        "v": TOKEN_VERSION,
        "run_id": run_id,
        "deployment_id": deployment_id,
        "iat": issued_at,
        "exp": issued_at + ttl_s,
    }
    if runner_id is not None:
        if not runner_id:
            raise ValueError("runner_id must be non-empty when given")
        claims["runner_id"] = runner_id
    encoded = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{encoded}.{_sign(secret, encoded)}"


def verify_workload_token(secret: str, token: str, *, now: float | None = None) -> WorkloadClaims:
    """Return the claims of `token`, raising `WorkloadTokenError` unless it is valid now."""
    if not secret:
        raise ValueError("workload secret is empty; set VMFLOW_WORKLOAD_SECRET")

    encoded, sep, signature = token.partition(".")
    if not sep or not encoded or not signature:
        raise WorkloadTokenError("malformed workload token: expected <claims>.<signature>")
    # compare_digest takes time independent of where the signatures differ.
    if not hmac.compare_digest(_sign(secret, encoded), signature):
        raise WorkloadTokenError("workload token signature does not match")

    try:
        claims = json.loads(_b64decode(encoded))
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise WorkloadTokenError(f"workload token claims are not valid JSON: {error}") from error
    if not isinstance(claims, dict) or claims.get("v") != TOKEN_VERSION:
        raise WorkloadTokenError(f"unsupported workload token version; expected {TOKEN_VERSION}")

    try:
        result = WorkloadClaims(
            run_id=str(claims["run_id"]),
            deployment_id=str(claims["deployment_id"]),
            issued_at=int(claims["iat"]),
            expires_at=int(claims["exp"]),
            runner_id=None if claims.get("runner_id") is None else str(claims["runner_id"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise WorkloadTokenError(f"workload token claims are incomplete: {error}") from error

    current = time.time() if now is None else now
    if current >= result.expires_at:
        raise WorkloadTokenError(f"workload token for run {result.run_id!r} has expired")
    return result
