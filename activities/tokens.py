"""Workload tokens for instances, minted inside activities so they never enter workflow history."""

from __future__ import annotations

from collections.abc import Callable

from vmflow.config import Settings

# (run_id, deployment_id, runner_id) -> token the instance channel sends to the workload API.
TokenIssuer = Callable[[str, str, str], str]


class MissingWorkloadSecretError(RuntimeError):
    """VMFLOW_WORKLOAD_SECRET is not set, so the worker cannot mint workload tokens."""


def workload_token_issuer(settings: Settings) -> TokenIssuer:
    """Return a function that mints a runner's workload token with VMFLOW_WORKLOAD_SECRET."""
    from vmflow.api.tokens import issue_workload_token

    secret = settings.VMFLOW_WORKLOAD_SECRET
    if secret is None or not secret.get_secret_value():
        raise MissingWorkloadSecretError(
            "VMFLOW_WORKLOAD_SECRET is not set; the worker needs the same value as the API "
            "to mint workload tokens for instances"
        )
    key = secret.get_secret_value()
    ttl_s = settings.VMFLOW_WORKLOAD_TOKEN_TTL_S

    def issue(run_id: str, deployment_id: str, runner_id: str) -> str:
        # The runner claim lets the workload API reject a stale runner that still has a token.
        return issue_workload_token(key, run_id, deployment_id, ttl_s, runner_id=runner_id)

    return issue
