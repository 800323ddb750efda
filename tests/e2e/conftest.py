"""Skip rules of the end-to-end tests: they need root for the sandbox and a working CRIU 4."""

from __future__ import annotations

import pytest

from tests.machine import CRIU, IS_ROOT


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and not IS_ROOT:
        pytest.skip("needs root for the gateway's sandbox driver (namespaces, cgroups)")
    if item.get_closest_marker("criu") and not CRIU.works:
        pytest.skip(f"needs a working CRIU 4 for snapshots: {CRIU.detail}")
