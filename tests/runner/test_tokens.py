"""Workload tokens: signed, scoped to one run and deployment, and expiring."""

from __future__ import annotations

import pytest

from vmflow.api.tokens import WorkloadTokenError, issue_workload_token, verify_workload_token

SECRET = "token-test-secret"


def test_token_round_trip_returns_claims() -> None:
    token = issue_workload_token(SECRET, "run_a", "dep_a", ttl_s=60, now=1_000)

    claims = verify_workload_token(SECRET, token, now=1_030)

    assert claims.run_id == "run_a"
    assert claims.deployment_id == "dep_a"
    assert claims.issued_at == 1_000
    assert claims.expires_at == 1_060


def test_token_expired_is_rejected() -> None:
    token = issue_workload_token(SECRET, "run_a", "dep_a", ttl_s=60, now=1_000)

    with pytest.raises(WorkloadTokenError, match="has expired"):
        verify_workload_token(SECRET, token, now=1_060)


def test_token_other_secret_is_rejected() -> None:
    token = issue_workload_token(SECRET, "run_a", "dep_a", ttl_s=60)

    with pytest.raises(WorkloadTokenError, match="signature does not match"):
        verify_workload_token("another-secret", token)


def test_token_tampered_claims_are_rejected() -> None:
    token = issue_workload_token(SECRET, "run_a", "dep_a", ttl_s=60)
    other = issue_workload_token(SECRET, "run_b", "dep_a", ttl_s=60)
    forged = f"{other.split('.')[0]}.{token.split('.')[1]}"

    with pytest.raises(WorkloadTokenError, match="signature does not match"):
        verify_workload_token(SECRET, forged)


@pytest.mark.parametrize("token", ["", "no-dot", ".sig", "claims.", "a.b.c"])
def test_token_malformed_is_rejected(token: str) -> None:
    with pytest.raises(WorkloadTokenError):
        verify_workload_token(SECRET, token)


@pytest.mark.parametrize(
    ("secret", "run_id", "deployment_id", "ttl_s"),
    [
        ("", "run", "dep", 60),
        (SECRET, "", "dep", 60),
        (SECRET, "run", "", 60),
        (SECRET, "r", "d", 0),
    ],
)
def test_token_issue_rejects_invalid_arguments(
    secret: str, run_id: str, deployment_id: str, ttl_s: int
) -> None:
    with pytest.raises(ValueError):
        issue_workload_token(secret, run_id, deployment_id, ttl_s)


def test_token_runner_claim_round_trips() -> None:
    with_runner = issue_workload_token(SECRET, "run_a", "dep_a", ttl_s=60, runner_id="run_a-r2")
    without_runner = issue_workload_token(SECRET, "run_a", "dep_a", ttl_s=60)

    assert verify_workload_token(SECRET, with_runner).runner_id == "run_a-r2"
    assert verify_workload_token(SECRET, without_runner).runner_id is None
    with pytest.raises(ValueError):
        issue_workload_token(SECRET, "run_a", "dep_a", ttl_s=60, runner_id="")
