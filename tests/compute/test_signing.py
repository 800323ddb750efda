"""HMAC signatures on gateway callbacks: good, tampered, stale, missing, malformed."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from vmflow.compute.signing import DEFAULT_TOLERANCE_S, SignatureError, sign, verify

SECRET = "callback-secret"
BODY = b'{"status":"completed","snapshot_id":"snap_1","instance_id":"inst_1"}'
NOW = 1_700_000_000


def test_signature_has_the_documented_form() -> None:
    header = sign(BODY, SECRET, timestamp=NOW)

    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert header == f"t={NOW},v1={expected}"


def test_good_signature_verifies() -> None:
    verify(BODY, sign(BODY, SECRET, timestamp=NOW), SECRET, now=NOW + 10)


def test_signature_without_timestamp_uses_the_clock() -> None:
    header = sign(BODY, SECRET)
    issued = int(header.split(",")[0].removeprefix("t="))
    assert abs(issued - time.time()) < 5
    verify(BODY, header, SECRET)


@pytest.mark.parametrize(
    "body",
    [
        BODY.replace(b"completed", b"failed"),
        BODY + b" ",
        b"",
    ],
)
def test_tampered_body_is_rejected(body: bytes) -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify(body, sign(BODY, SECRET, timestamp=NOW), SECRET, now=NOW)


def test_wrong_secret_is_rejected() -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify(BODY, sign(BODY, "other-secret", timestamp=NOW), SECRET, now=NOW)


def test_tampered_digest_is_rejected() -> None:
    header = sign(BODY, SECRET, timestamp=NOW)
    last = header[-1]
    tampered = header[:-1] + ("0" if last != "0" else "1")
    with pytest.raises(SignatureError, match="does not match"):
        verify(BODY, tampered, SECRET, now=NOW)


def test_moved_timestamp_is_rejected() -> None:
    """The timestamp is signed too: replaying the digest with a fresh t= fails."""
    digest = sign(BODY, SECRET, timestamp=NOW).split("v1=", 1)[1]
    with pytest.raises(SignatureError, match="does not match"):
        verify(BODY, f"t={NOW + 100},v1={digest}", SECRET, now=NOW + 100)


@pytest.mark.parametrize("age", [DEFAULT_TOLERANCE_S + 1, 3600, -(DEFAULT_TOLERANCE_S + 1)])
def test_stale_or_future_signature_is_rejected(age: int) -> None:
    header = sign(BODY, SECRET, timestamp=NOW)
    with pytest.raises(SignatureError, match="outside 300 s"):
        verify(BODY, header, SECRET, now=NOW + age)


def test_signature_at_the_edge_of_the_tolerance_verifies() -> None:
    header = sign(BODY, SECRET, timestamp=NOW)
    verify(BODY, header, SECRET, now=NOW + DEFAULT_TOLERANCE_S)
    with pytest.raises(SignatureError):
        verify(BODY, header, SECRET, now=NOW + 61, tolerance_s=60)


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header_is_rejected(header: str | None) -> None:
    with pytest.raises(SignatureError, match="missing X-Vmflow-Signature"):
        verify(BODY, header, SECRET, now=NOW)


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        f"t={NOW}",
        "v1=abcdef",
        f"t=yesterday,v1={'0' * 64}",
        f"t=-{NOW},v1={'0' * 64}",
        f"t={NOW},v1=",
    ],
)
def test_malformed_header_is_rejected(header: str) -> None:
    with pytest.raises(SignatureError, match="malformed"):
        verify(BODY, header, SECRET, now=NOW)


def test_signature_error_is_a_value_error() -> None:
    assert issubclass(SignatureError, ValueError)
