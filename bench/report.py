"""Printing of figures, and the facts about the machine a run measured on."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path


def median_ms(seconds: Sequence[float]) -> float:
    """Return the median of `seconds` in milliseconds."""
    return statistics.median(seconds) * 1000


def format_ms(milliseconds: float) -> str:
    """Format a duration in ms, switching to seconds from 10 s on."""
    if milliseconds >= 10_000:
        return f"{milliseconds / 1000:,.1f} s"
    return f"{milliseconds:,.1f} ms"


def format_ratio(numerator: float, denominator: float) -> str:
    if denominator <= 0:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def format_mib(size_bytes: float) -> str:
    return f"{size_bytes / 1024**2:,.1f} MiB"


class Table:
    """Rows of text printed as aligned columns; the first column is left-aligned."""

    def __init__(self, *columns: str) -> None:
        self.columns = columns
        self.rows: list[tuple[str, ...]] = []

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"expected {len(self.columns)} cells, got {len(cells)}: {cells}")
        self.rows.append(tuple(str(cell) for cell in cells))

    def render(self) -> str:
        widths = [
            max(len(row[index]) for row in [self.columns, *self.rows])
            for index in range(len(self.columns))
        ]
        lines = []
        for row in [self.columns, *self.rows]:
            cells = [
                cell.ljust(width) if index == 0 else cell.rjust(width)
                for index, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)


def heading(name: str, command: str) -> None:
    print(f"\n== {name} ==", flush=True)
    print(f"command: {command}", flush=True)


def emit(text: str = "") -> None:
    print(text, flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return format_mib(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return "unknown"


def _tool_version(command: list[str]) -> str:
    if shutil.which(command[0]) is None and not Path(command[0]).exists():
        return "not found"
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    lines = (completed.stdout or completed.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def machine_lines() -> list[str]:
    """Describe the machine: CPUs, memory, kernel, CPU model, load, and tool versions."""
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    temporal = Path(sys.executable).parent / "temporal"
    return [
        f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"cpus (nproc): {os.cpu_count()}",
        f"memory: {_memory_total()}",
        f"kernel: {platform.release()}",
        f"cpu model: {_cpu_model()}",
        f"load average at start (1, 5, 15 min): {load}",
        f"python: {platform.python_version()}",
        f"temporal cli: {_tool_version([str(temporal), '--version'])}",
        f"criu: {_tool_version(['criu', '--version']) if shutil.which('criu') else 'not found'}",
    ]
