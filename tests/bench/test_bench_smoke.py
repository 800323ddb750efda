"""The benchmark suite end to end at a tiny size: every figure printed, and the snapshot rule held.

These tests check output and correctness, never a time. Each runs
`python -m bench` from the repository root, as docs/benchmarks.md documents.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.machine import CRIU, IS_ROOT

REPOSITORY = Path(__file__).resolve().parents[2]
SUITE_TIMEOUT_S = 900

pytestmark = pytest.mark.slow


def run_bench(*arguments: str) -> str:
    """Run `python -m bench ARGUMENTS`; return its output, failing with it on a non-zero exit."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench", *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT_S,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"python -m bench exited {completed.returncode}:\n{output}"
    return output


def table_row(output: str, label: str) -> list[str]:
    """Return the cells after `label` on the line that starts with it."""
    match = re.search(rf"^{re.escape(label)}\s+(.*)$", output, re.MULTILINE)
    assert match is not None, f"no line starting with {label!r} in:\n{output}"
    return match.group(1).split()


def test_delayed_snapshots_only_after_delay() -> None:
    # A 2 s delay leaves 200 ms between the 90% resolution and the timer on a busy machine.
    output = run_bench("delayed-snapshots", "--repeats", "2", "--warmup", "0", "--delay-ms", "2000")

    assert "command: .venv/bin/python -m bench delayed-snapshots" in output
    for label in ("10% of delay", "50% of delay", "90% of delay"):
        runs, snapshots, restores = table_row(output, label)[:3]
        assert runs == "2", label
        assert snapshots == "0", f"{label}: a snapshot before the delay passed"
        assert restores == "0", label
    runs, snapshots, restores = table_row(output, "200% of delay")[:3]
    assert runs == "2"
    assert snapshots == "2", "a waitpoint resolved at 200% of the delay was not snapshotted"
    assert restores == "2"
    assert "snapshots below 100% of the delay: 0 (expected 0)" in output


def test_overhead_and_scale_print_figures() -> None:
    output = run_bench(
        "overhead",
        "scale",
        "--overhead-runs", "4",
        "--overhead-repeats", "1",
        "--concurrency", "2",
        "--runs", "5",
    )  # fmt: skip

    assert "command: .venv/bin/python -m bench overhead" in output
    assert re.search(r"^RunExecutionWorkflow, no-op task\s+\d+\.\d", output, re.MULTILINE)
    assert re.search(r"^bare workflow, \d+ no-op activities\s+\d+\.\d", output, re.MULTILINE)
    assert re.search(r"^full / bare throughput: \d+\.\d\dx$", output, re.MULTILINE)

    assert "command: .venv/bin/python -m bench scale --runs 5" in output
    assert table_row(output, "runs SUSPENDED in Temporal visibility") == ["5"]
    assert table_row(output, "runs completed with 1 snapshot and 1 restore") == ["5", "of", "5"]
    assert table_row(output, "runs lost") == ["0"]
    for label in ("worker RSS, 5 suspended", "Temporal server RSS, 5 suspended"):
        assert re.fullmatch(r"[\d,]+\.\d", table_row(output, label)[0]), label
    assert table_row(output, "time to resume all 5 (first resolve -> last EXECUTING)")


@pytest.mark.root
@pytest.mark.criu
@pytest.mark.skipif(not IS_ROOT, reason="needs root for the sandbox driver")
@pytest.mark.skipif(not CRIU.works, reason=f"needs a working CRIU 4: {CRIU.detail}")
def test_sandbox_benchmarks_print_figures() -> None:
    output = run_bench(
        "resume", "warm-start", "gateway",
        "--repeats", "1",
        "--warmup", "0",
        "--list-size", "100000",
    )  # fmt: skip

    assert "skipped:" not in output
    for label in (
        "resume, snapshotted (token -> task running)",
        "resume, in place (no snapshot)",
        "floor: plain criu restore, comparable process",
        "create, cold boot",
        "create, from template",
        "snapshot (request -> callback)",
        "restore (request -> next line)",
    ):
        assert re.match(r"[\d,]+\.\d", table_row(output, label)[0]), label
    assert re.search(r"^sandbox snapshot of the runner, median: [\d,]+\.\d MiB$", output, re.M)
    assert output.count("microvm driver: not implemented") == 2
    assert re.search(r"^cold / template: \d+\.\d\dx$", output, re.MULTILINE)
