"""Holds state in memory (a counter and a large list) and prints it on every tick.

It also appends each tick to /scratch/ticks.txt through a file it keeps open, so a
restore needs the scratch files that were snapshotted with it. After start-up it
reports ready on the channel. Every 20 ticks it reads its identity
over the channel, so a restore's new generation and metadata show up in the output.
"""

import os
import time

import channel_client

data = list(range(int(os.environ.get("COUNTER_LIST_SIZE", "3000000"))))
checksum = sum(data)
counter = 0
ticks_file = open("/scratch/ticks.txt", "a")
print(f"start pid={os.getpid()} checksum={checksum}", flush=True)
channel_client.request("POST", "/_gateway/ready")
while True:
    counter += 1
    print(f"tick {counter} checksum={sum(data)} length={len(data)}", flush=True)
    ticks_file.write(f"{counter}\n")
    ticks_file.flush()
    if counter % 20 == 0:
        status, identity = channel_client.request("GET", "/_gateway/instance")
        runner = identity["env"].get("VMFLOW_RUNNER_ID", "")
        print(f"identity generation={identity['generation']} runner={runner}", flush=True)
    time.sleep(0.02)
