"""A minimal client of the instance channel for test programs inside a sandbox."""

import http.client
import json
import os
import socket
import time


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def request(method: str, path: str, body: object = None, deadline_s: float = 60.0):
    """Send one request per connection, retrying refused connections (the gateway may pause)."""
    payload = None if body is None else json.dumps(body).encode()
    deadline = time.monotonic() + deadline_s
    while True:
        connection = _UnixConnection(os.environ["VMFLOW_CHANNEL"])
        try:
            connection.request(method, path, body=payload, headers={"Connection": "close"})
            response = connection.getresponse()
            raw = response.read()
            return response.status, (json.loads(raw) if raw.strip() else None)
        except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            connection.close()
