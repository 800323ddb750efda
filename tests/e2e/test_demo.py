"""The demo's steps with every part real: dev server, gateway with sandbox and CRIU, API, worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from vmflow.cli.demo import DemoResult, DemoTargets, run_demo
from vmflow.cli.stack import LocalStack, StackPorts
from vmflow.storage.db import create_engine_from_url, session_factory, session_scope
from vmflow.storage.models import CheckpointType, RunLogLine, TaskRunCheckpoint
from workflows import contract

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.slow]


@pytest.fixture
def local_stack(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalStack]:
    """The stack `vmflow dev` runs, on free ports, a fresh data directory and `database_url`."""
    data_dir = tmp_path / "data"
    # The demo builds its image into the store of this data directory, where the
    # gateway child reads it.
    monkeypatch.setenv("VMFLOW_DATA_DIR", str(data_dir))
    stack = LocalStack(
        data_dir,
        StackPorts(temporal=0, temporal_ui=0, api=0, gateway=0),
        database_url=database_url,
        environment={
            "COMPUTE_SNAPSHOT_DELAY_MS": "2000",
            "VMFLOW_GATEWAY_CGROUP_PARENT": f"vmflow-e2e-{uuid.uuid4().hex[:8]}",
        },
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _demo(stack: LocalStack) -> DemoResult:
    return run_demo(DemoTargets.of_stack(stack), emit=lambda message: None, timeout_s=180)


def test_demo_snapshots_once_and_reports_from_memory(local_stack: LocalStack) -> None:
    result = _demo(local_stack)
    run = result.run
    run_id = run["id"]

    # The deployment pre-warmed a template, so the run's instance came from it.
    assert result.deployment["status"] == "DEPLOYED"
    assert result.deployment["template_mode"] == "required"
    assert result.deployment["template_id"]
    assert result.timeline.provision_mode == "warm"

    assert run["status"] == "COMPLETED", run.get("error")
    assert len(result.timeline.snapshot_ids) == 1
    assert result.timeline.restores == 1
    steps = [entry.step for entry in result.timeline.entries]
    for step in ("suspend requested", "snapshot taken", "restore", "task returned"):
        assert step in steps

    engine = create_engine_from_url(local_stack.database_url)
    try:
        with session_scope(session_factory(engine)) as session:
            checkpoints = session.scalars(
                select(TaskRunCheckpoint).where(TaskRunCheckpoint.run_id == run_id)
            ).all()
            log_lines = session.scalars(
                select(RunLogLine).where(RunLogLine.run_id == run_id).order_by(RunLogLine.id)
            ).all()
            checkpoint_facts = [(row.type, row.location) for row in checkpoints]
            logs = [(row.runner_id, row.message) for row in log_lines]
    finally:
        engine.dispose()
    assert checkpoint_facts == [(CheckpointType.COMPUTE, result.timeline.snapshot_ids[0])]

    # The aggregates were computed once, by the first runner, before the
    # snapshot; the restored runner wrote the report from that memory.
    report = run["output"]
    first_runner = contract.runner_id_for(run_id, 1)
    restored_runner = contract.runner_id_for(run_id, 2)
    assert report["started_as_runner"] == first_runner
    assert report["finished_as_runner"] == restored_runner
    aggregated = [message for runner, message in logs if "aggregated" in message]
    assert len(aggregated) == 1
    assert report["aggregation_id"] in aggregated[0]
    assert [runner for runner, message in logs if "aggregated" in message] == [first_runner]
    assert report["approval"]["approver"] == "vmflow demo"
    assert len(report["months"]) == 12

    assert local_stack.secrets is not None
    instances = httpx.get(
        f"{local_stack.gateway_url}/api/instances",
        headers={"Authorization": f"Bearer {local_stack.secrets.gateway_token}"},
        timeout=10,
    )
    assert instances.status_code == 200
    assert instances.json() == []
