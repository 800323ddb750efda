"""Workload tokens minted by the worker's activities."""

from __future__ import annotations

from pydantic import SecretStr

from activities.tokens import workload_token_issuer
from vmflow.api.tokens import verify_workload_token
from vmflow.config import load_settings


def test_token_issuer_names_the_runner() -> None:
    settings = load_settings(VMFLOW_WORKLOAD_SECRET=SecretStr("test-secret"))
    issue = workload_token_issuer(settings)

    claims = verify_workload_token("test-secret", issue("run_a", "dep_a", "run_a-r2"))

    assert claims.run_id == "run_a"
    assert claims.deployment_id == "dep_a"
    assert claims.runner_id == "run_a-r2"
