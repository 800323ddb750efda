"""Run vmflow's benchmarks: `python -m bench` runs all of them in order, `python -m bench NAME` one.

Run from the repository root as root, with CRIU 4 installed
(scripts/install-criu.sh), because resume, warm-start and gateway use real
sandboxes. Each benchmark prints the command that reproduces its figures.
The exit status is 1 when a correctness check fails (a snapshot below the
delay, a lost run) and 0 otherwise, whatever the times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable

from bench import delayed_snapshots, overhead, resume, scale, warm_start
from bench.report import emit, heading, machine_lines
from bench.sandbox import SandboxUnavailableError

NAMES = ("delayed-snapshots", "resume", "warm-start", "overhead", "scale", "gateway")
COMMAND = ".venv/bin/python -m bench"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run vmflow's benchmarks and print medians and ratios.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"Benchmarks to run, in the order given (default: all). One of: {', '.join(NAMES)}.",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="Measured repetitions per figure (default 5)."
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="Unmeasured repetitions first (default 1)."
    )
    parser.add_argument(
        "--delay-ms",
        type=int,
        default=1000,
        help="COMPUTE_SNAPSHOT_DELAY_MS of delayed-snapshots and resume, in ms (default 1000).",
    )
    parser.add_argument(
        "--overhead-runs",
        type=int,
        default=100,
        help="Runs per batch of the overhead benchmark (default 100).",
    )
    parser.add_argument(
        "--overhead-repeats",
        type=int,
        default=3,
        help="Batches of each workflow in the overhead benchmark (default 3).",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=20,
        help="Runs in flight in the overhead benchmark (default 20).",
    )
    parser.add_argument(
        "--runs", type=int, default=1000, help="Runs suspended at once in scale (default 1000)."
    )
    parser.add_argument(
        "--list-size",
        type=int,
        default=1_000_000,
        help="Integers the warm-start and gateway program keeps in memory (default 1000000).",
    )
    arguments = parser.parse_args(argv)
    for name in arguments.names:
        if name not in NAMES:
            parser.error(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    for option in ("repeats", "overhead_runs", "overhead_repeats", "concurrency", "runs"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if arguments.warmup < 0 or arguments.delay_ms < 1:
        parser.error("--warmup must be at least 0 and --delay-ms at least 1")
    return arguments


def _command(name: str, *options: str) -> str:
    return " ".join([COMMAND, name, *options])


class Suite:
    """The benchmarks with the options of one invocation; `failures` lists failed checks."""

    def __init__(self, arguments: argparse.Namespace) -> None:
        self.arguments = arguments
        self.failures: list[str] = []

    def run(self, name: str) -> None:
        benchmarks: dict[str, Callable[[], None]] = {
            "delayed-snapshots": self.delayed_snapshots,
            "resume": self.resume,
            "warm-start": self.warm_start,
            "overhead": self.overhead,
            "scale": self.scale,
            "gateway": self.gateway,
        }
        started = time.monotonic()
        try:
            benchmarks[name]()
        except SandboxUnavailableError as error:
            emit(f"skipped: {error}")
        emit(f"({name} took {time.monotonic() - started:.0f} s)")

    def delayed_snapshots(self) -> None:
        a = self.arguments
        heading(
            "delayed snapshots",
            _command(
                "delayed-snapshots",
                f"--repeats {a.repeats}",
                f"--warmup {a.warmup}",
                f"--delay-ms {a.delay_ms}",
            ),
        )
        result = asyncio.run(delayed_snapshots.measure(a.repeats, a.delay_ms, a.warmup))
        delayed_snapshots.report(result)
        if result.snapshots_below_delay() != 0:
            self.failures.append("delayed-snapshots: a snapshot was taken below 100% of the delay")
        late = result.fractions[-1]
        if sum(late.snapshots) != len(late.snapshots):
            self.failures.append(
                "delayed-snapshots: a waitpoint resolved at 200% of the delay was not snapshotted"
            )

    def resume(self) -> None:
        a = self.arguments
        heading(
            "resume latency",
            _command(
                "resume",
                f"--repeats {a.repeats}",
                f"--warmup {a.warmup}",
                f"--delay-ms {a.delay_ms}",
            ),
        )
        resume.report(resume.measure(a.repeats, a.warmup, a.delay_ms))

    def warm_start(self) -> None:
        a = self.arguments
        heading(
            "warm start",
            _command("warm-start", f"--repeats {a.repeats}", f"--list-size {a.list_size}"),
        )
        warm_start.report_warm_start(warm_start.measure(a.repeats, a.list_size))

    def overhead(self) -> None:
        a = self.arguments
        heading(
            "orchestration overhead",
            _command(
                "overhead",
                f"--overhead-runs {a.overhead_runs}",
                f"--overhead-repeats {a.overhead_repeats}",
                f"--concurrency {a.concurrency}",
                f"--warmup {a.warmup}",
            ),
        )
        # Warm-up runs as many runs as one batch's concurrency, so every slot is warmed.
        warmup = a.concurrency if a.warmup > 0 else 0
        result = asyncio.run(
            overhead.measure(a.overhead_runs, a.overhead_repeats, a.concurrency, warmup)
        )
        overhead.report(result)

    def scale(self) -> None:
        a = self.arguments
        heading("scale", _command("scale", f"--runs {a.runs}"))
        result = asyncio.run(scale.measure(a.runs))
        scale.report(result)
        if result.lost:
            self.failures.append(f"scale: {len(result.lost)} of {result.runs} runs lost")

    def gateway(self) -> None:
        a = self.arguments
        heading(
            "gateway (bench/gateway.py)",
            _command("gateway", f"--repeats {a.repeats}", f"--list-size {a.list_size}"),
        )
        warm_start.report_gateway(warm_start.measure(a.repeats, a.list_size))


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    names = arguments.names or list(NAMES)
    emit("vmflow benchmarks")
    for line in machine_lines():
        emit(f"  {line}")
    emit("  NOTE: medians of repeated runs; on a shared machine they move between invocations")

    suite = Suite(arguments)
    started = time.monotonic()
    for name in names:
        suite.run(name)
    emit(f"\nsuite took {time.monotonic() - started:.0f} s")
    for failure in suite.failures:
        emit(f"FAILED: {failure}")
    return 1 if suite.failures else 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # NOTE: exiting through the interpreter's shutdown sometimes aborts with
    # "PyGILState_Release" after a Temporal worker ran (temporalio 1.35); os._exit avoids it.
    os._exit(status)
