"""A task that fails on purpose, to show how an error reaches the run.

The run ends FAILED with the exception's name, message and traceback; the
log lines written before the failure stay in the run's log.
"""

from __future__ import annotations

from typing import Any

from vmflow.runner import RunContext, task


class ReportValidationError(Exception):
    """The input of a report is invalid."""


def validate(rows: list[dict[str, Any]]) -> None:
    for index, row in enumerate(rows):
        if row.get("precipitation", 0) < 0:
            raise ReportValidationError(
                f"row {index} has negative precipitation {row['precipitation']}; "
                "precipitation is measured in mm and cannot be below 0"
            )


@task(id="failing-task")
def failing_task(payload: Any, ctx: RunContext) -> None:
    rows = [
        {"date": "2015-01-01", "precipitation": 0.0},
        {"date": "2015-01-02", "precipitation": -1.5},
    ]
    ctx.logger.info("validating %d rows", len(rows))
    validate(rows)
