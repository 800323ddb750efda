"""Aggregate Seattle's daily weather, wait for an approval, then write the report.

The aggregates are computed once and kept only in the task's memory while it
waits for the approval token, which may take days. The run is snapshotted,
its instance deleted, and a restore brings the same memory back. The report
then carries the `aggregation_id` drawn before the wait, which proves that
the aggregates were not computed again.

Payload (every key optional): `{"year": 2012..2015, "approval_timeout_s": 86400}`.
Complete the token with `{"approver": "...", "note": "..."}`.
"""

from __future__ import annotations

import csv
import os
import statistics
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmflow.runner import RunContext, task, wait

DATA_FILE = Path(__file__).parent / "data" / "seattle-weather.csv"
DEFAULT_APPROVAL_TIMEOUT_S = 86_400


@dataclass(frozen=True)
class MonthSummary:
    month: str
    days: int
    mean_temp_max_c: float
    mean_temp_min_c: float
    precipitation_mm: float
    # Days with any precipitation. The table's weather labels often say sun or fog on such days.
    wet_days: int
    most_common_weather: str


@dataclass(frozen=True)
class Aggregates:
    """Monthly summaries and extremes, kept only in memory across the wait."""

    aggregation_id: str
    aggregated_at: str
    aggregated_by_pid: int
    year: int
    months: list[MonthSummary]
    wettest_day: tuple[str, float]
    warmest_day: tuple[str, float]


def aggregate(year: int) -> Aggregates:
    """Read the CSV and summarize `year` by month."""
    rows_by_month: dict[str, list[dict[str, str]]] = defaultdict(list)
    with DATA_FILE.open(newline="") as file:
        for row in csv.DictReader(file):
            if row["date"].startswith(f"{year}/"):
                rows_by_month[row["date"][:7].replace("/", "-")].append(row)
    if not rows_by_month:
        raise ValueError(f"no weather data for year {year}; the data covers 2012 to 2015")

    months = []
    wettest = ("", -1.0)
    warmest = ("", -273.0)
    for month, rows in sorted(rows_by_month.items()):
        for row in rows:
            precipitation = float(row["precipitation"])
            temp_max = float(row["temp_max"])
            if precipitation > wettest[1]:
                wettest = (row["date"].replace("/", "-"), precipitation)
            if temp_max > warmest[1]:
                warmest = (row["date"].replace("/", "-"), temp_max)
        months.append(
            MonthSummary(
                month=month,
                days=len(rows),
                mean_temp_max_c=round(statistics.fmean(float(r["temp_max"]) for r in rows), 1),
                mean_temp_min_c=round(statistics.fmean(float(r["temp_min"]) for r in rows), 1),
                precipitation_mm=round(sum(float(r["precipitation"]) for r in rows), 1),
                wet_days=sum(1 for r in rows if float(r["precipitation"]) > 0),
                most_common_weather=Counter(r["weather"] for r in rows).most_common(1)[0][0],
            )
        )
    return Aggregates(
        aggregation_id=uuid.uuid4().hex,
        aggregated_at=datetime.now(UTC).isoformat(),
        aggregated_by_pid=os.getpid(),
        year=year,
        months=months,
        wettest_day=wettest,
        warmest_day=warmest,
    )


def parse_payload(payload: Any) -> tuple[int, float]:
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise ValueError(f"payload must be a JSON object, got {type(payload).__name__}")
    year = payload.get("year", 2015)
    if not isinstance(year, int) or not 2012 <= year <= 2015:
        raise ValueError(f"payload year must be an integer from 2012 to 2015, got {year!r}")
    timeout_s = payload.get("approval_timeout_s", DEFAULT_APPROVAL_TIMEOUT_S)
    if not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise ValueError(f"payload approval_timeout_s must be a positive number, got {timeout_s!r}")
    return year, float(timeout_s)


def parse_approval(approval: Any) -> tuple[str, str]:
    if not isinstance(approval, dict):
        raise ValueError(
            f"the approval token was completed with {approval!r}; "
            'complete it with {"approver": "...", "note": "..."}'
        )
    return str(approval.get("approver") or "unknown"), str(approval.get("note") or "")


def write_report(
    aggregates: Aggregates, approver: str, note: str, started_as: str, finished_as: str
) -> dict[str, Any]:
    """Build the report from the in-memory aggregates and the approver's note."""
    lines = [
        f"# Seattle weather {aggregates.year}",
        "",
        "| month | days | mean max °C | mean min °C | precipitation mm | wet days | weather |",
        "|---|---|---|---|---|---|---|",
    ]
    for month in aggregates.months:
        lines.append(
            f"| {month.month} | {month.days} | {month.mean_temp_max_c} | "
            f"{month.mean_temp_min_c} | {month.precipitation_mm} | {month.wet_days} | "
            f"{month.most_common_weather} |"
        )
    total_precipitation = round(sum(month.precipitation_mm for month in aggregates.months), 1)
    lines += [
        "",
        f"Total precipitation: {total_precipitation} mm. "
        f"Wettest day: {aggregates.wettest_day[0]} ({aggregates.wettest_day[1]} mm). "
        f"Warmest day: {aggregates.warmest_day[0]} ({aggregates.warmest_day[1]} °C).",
        "",
        f"Approved by {approver}: {note}",
    ]
    return {
        "year": aggregates.year,
        "aggregation_id": aggregates.aggregation_id,
        "aggregated_at": aggregates.aggregated_at,
        "aggregated_by_pid": aggregates.aggregated_by_pid,
        "months": [month.__dict__ for month in aggregates.months],
        "total_precipitation_mm": total_precipitation,
        "wettest_day": list(aggregates.wettest_day),
        "warmest_day": list(aggregates.warmest_day),
        "approval": {"approver": approver, "note": note},
        "started_as_runner": started_as,
        "finished_as_runner": finished_as,
        "reported_at": datetime.now(UTC).isoformat(),
        "markdown": "\n".join(lines),
    }


@task(id="approval-report")
def approval_report(payload: Any, ctx: RunContext) -> dict[str, Any]:
    year, timeout_s = parse_payload(payload)
    aggregates = aggregate(year)
    started_as = ctx.runner_id
    ctx.logger.info(
        "aggregated %d months of %d as %s; waiting for approval",
        len(aggregates.months),
        year,
        aggregates.aggregation_id,
    )

    approval = wait.for_token(timeout=timeout_s, key="approval")

    approver, note = parse_approval(approval)
    ctx.logger.info("approved by %s; writing the report", approver)
    return write_report(aggregates, approver, note, started_as, ctx.runner_id)


@task(id="approval-report-async")
async def approval_report_async(payload: Any, ctx: RunContext) -> dict[str, Any]:
    year, timeout_s = parse_payload(payload)
    aggregates = aggregate(year)
    started_as = ctx.runner_id
    ctx.logger.info(
        "aggregated %d months of %d as %s; waiting for approval",
        len(aggregates.months),
        year,
        aggregates.aggregation_id,
    )

    approval = await wait.for_token_async(timeout=timeout_s, key="approval")

    approver, note = parse_approval(approval)
    ctx.logger.info("approved by %s; writing the report", approver)
    return write_report(aggregates, approver, note, started_as, ctx.runner_id)
