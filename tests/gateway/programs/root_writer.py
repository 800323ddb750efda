"""Tries to write to the root on every tick and prints whether it could.

The tries go on across a snapshot, so the output shows whether a restored
sandbox has the read-only root of a cold start.
"""

import os
import time

tick = 0
print(f"start pid={os.getpid()}", flush=True)
while True:
    tick += 1
    try:
        with open(f"/probe-{tick}", "w") as probe:
            probe.write("x")
        outcome = "writable"
    except OSError:
        outcome = "read-only"
    print(f"tick {tick} root={outcome}", flush=True)
    time.sleep(0.05)
