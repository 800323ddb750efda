"""Warm start: instance create from a template versus a cold boot, per driver.

The measurement is `bench/gateway.py`'s, the gateway's own benchmark. It runs
a real gateway with the sandbox driver and CRIU in this process, and an image
whose program imports what a typical task imports and keeps a list in memory.
Each create is timed from the request until the program's next output line.
The same call also times snapshot and restore, which the `gateway` benchmark
prints; one invocation of the suite measures all of it once.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from dataclasses import dataclass

from bench import gateway
from bench.report import Table, emit, format_mib, format_ms, format_ratio
from bench.sandbox import MICROVM_LINE, check_sandbox_machine


@dataclass
class GatewayResult:
    runs: int
    list_size: int
    seconds: dict[str, list[float]]


# Results by (runs, list size), so warm-start and gateway in one invocation measure once.
_measured: dict[tuple[int, int], GatewayResult] = {}


def measure(runs: int, list_size: int) -> GatewayResult:
    """Run bench/gateway.py's measurement once per (runs, list_size) in this process."""
    key = (runs, list_size)
    if key not in _measured:
        check_sandbox_machine()
        _measured[key] = GatewayResult(runs, list_size, asyncio.run(gateway.run(runs, list_size)))
    return _measured[key]


def _row(table: Table, label: str, samples: list[float], baseline: float | None = None) -> None:
    median = statistics.median(samples) * 1000
    table.add(
        label,
        format_ms(median),
        format_ms(min(samples) * 1000),
        format_ms(max(samples) * 1000),
        format_ratio(median, baseline) if baseline else "",
    )


def report_warm_start(result: GatewayResult) -> None:
    emit(
        "real: gateway (bench/gateway.py) with the sandbox driver and CRIU, in this process; "
        f"{result.runs} creates each, program keeps {result.list_size:,} integers, "
        f"{os.cpu_count()} CPUs"
    )
    emit("create is timed from the request until the program prints its next line")
    seconds = result.seconds
    template = statistics.median(seconds["template"]) * 1000
    table = Table("sandbox driver", "median", "min", "max", "ratio to template")
    _row(table, "create, cold boot", seconds["cold"], template)
    _row(table, "create, from template", seconds["template"], template)
    emit(table.render())
    emit(f"cold / template: {format_ratio(statistics.median(seconds['cold']) * 1000, template)}")
    emit(MICROVM_LINE)


def report_gateway(result: GatewayResult) -> None:
    emit(
        "real: gateway (bench/gateway.py) with the sandbox driver and CRIU; each operation as "
        "the client sees it, HTTP included"
    )
    seconds = result.seconds
    table = Table("operation", "median", "min", "max", "")
    _row(table, "create, cold boot", seconds["cold"])
    _row(table, "create, from template", seconds["template"])
    _row(table, "snapshot (request -> callback)", seconds["snapshot"])
    _row(table, "restore (request -> next line)", seconds["restore"])
    emit(table.render())
    emit(f"snapshot size, median: {format_mib(statistics.median(seconds['size']))}")
