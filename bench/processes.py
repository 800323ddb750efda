"""Resident memory of processes, read from /proc."""

from __future__ import annotations

import os
from pathlib import Path


def rss_bytes(pid: int) -> int:
    """Return the resident set size (VmRSS) of process `pid` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line; is {pid} a kernel thread?")


def children(pid: int) -> list[int]:
    """Return the pids of the direct children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name in field 2 may contain spaces, so split after its ")".
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def tree_rss_bytes(pid: int) -> int:
    """Return the resident memory of `pid` and all of its descendants."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            total += rss_bytes(current)
        except (OSError, ValueError):
            continue
        pending.extend(children(current))
    return total


def own_rss_bytes() -> int:
    return rss_bytes(os.getpid())
