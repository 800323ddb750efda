"""Reports ready on the instance channel, then prints a counter held in memory twice a second."""

import time

import channel_client

counter = 0
channel_client.request("POST", "/_gateway/ready")
while True:
    counter += 1
    print(f"tick {counter}", flush=True)
    time.sleep(0.5)
