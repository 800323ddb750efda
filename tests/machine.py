"""What this machine offers the tests that run real sandboxes: root, and a working CRIU 4."""

from __future__ import annotations

import os

from vmflow.gateway.drivers.criu import check_configured_criu

IS_ROOT = os.geteuid() == 0
CRIU = check_configured_criu()
