"""Replay committed workflow histories, so a change to workflow code that breaks
determinism for runs already in flight fails here.

Regenerate them with `VMFLOW_RECORD_HISTORIES=1 pytest tests/workflows` when
a change is meant to be incompatible (and guard it with `workflow.patched`
otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.workflows.conftest import HISTORY_DIR
from worker import WORKFLOWS

HISTORIES: dict[str, Path] = {path.stem: path for path in sorted(HISTORY_DIR.glob("*.json"))}


def load_history(name: str) -> WorkflowHistory:
    data = json.loads(HISTORIES[name].read_text())
    return WorkflowHistory.from_json(f"replay-{name}", data)


def test_replay_histories_are_committed() -> None:
    expected = {
        "run_snapshot_restore",
        "run_in_place",
        "deploy_required",
        "template_build",
        "run_instance_exited",
        "run_cancel_during_snapshot",
        "run_timeout_during_snapshot",
    }
    assert expected <= set(HISTORIES)


@pytest.mark.parametrize("name", list(HISTORIES))
async def test_replay_recorded_history(name: str) -> None:
    history = load_history(name)

    result = await Replayer(workflows=list(WORKFLOWS)).replay_workflow(history)

    assert result.replay_failure is None
