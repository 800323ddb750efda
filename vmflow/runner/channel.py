"""HTTP client of the instance channel, the Unix socket that links a runner to the outside.

Each request opens a new connection and closes it after the response, so no
connection is open when the gateway snapshots the instance. The gateway
rejects connections while it takes a snapshot. So refused, reset and dropped
connections, and the proxy's 502, 503 and 504, are retried with backoff until
`retry_deadline_s` has passed. A request the server already handled may
thus be sent twice, which the workload API allows for every route.

The deadline of a workload API request counts from the first failure of a
streak that spans requests: it ends only when the workload API returns a
response. Otherwise a runner that sends one request after another (a
waitpoint poll, then its logs, then its result) would get a fresh
`retry_deadline_s` for each of them while the API stays unreachable.
Requests to the gateway itself (`/_gateway/...`) keep a deadline of their
own, because the gateway may respond while its proxy target is dead.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

GATEWAY_INSTANCE_PATH = "/_gateway/instance"
GATEWAY_READY_PATH = "/_gateway/ready"

_RETRYABLE_STATUSES = frozenset({502, 503, 504})
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0
# A sleep that overran by more than this was a freeze (a snapshot restored
# later), not a slow host, so the overrun does not count toward the deadline.
_FREEZE_OVERRUN_S = 5.0


class ChannelError(Exception):
    """Root of the errors the channel client raises."""


class ChannelUnavailableError(ChannelError):
    """The channel refused or dropped every attempt until the retry deadline."""


class WorkloadAPIError(ChannelError):
    """The workload API (or the channel itself) returned an HTTP error status.

    `code` is the machine-readable code of the workload API's error body
    (`{"detail": {"code", "message"}}`), or "" when the body has none.
    """

    def __init__(self, method: str, path: str, status: int, code: str, message: str) -> None:
        super().__init__(f"{method} {path} failed with HTTP {status}: {message}")
        self.method = method
        self.path = path
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class InstanceIdentity:
    """The instance's current identity as `GET /_gateway/instance` returns it."""

    id: str
    name: str
    image: str
    env: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    generation: int = 0
    restored_from: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.env.get("VMFLOW_RUN_ID") or None

    @property
    def runner_id(self) -> str | None:
        return self.env.get("VMFLOW_RUNNER_ID") or None

    @property
    def deployment_id(self) -> str | None:
        return self.env.get("VMFLOW_DEPLOYMENT_ID") or None

    @classmethod
    def from_json(cls, data: Any) -> InstanceIdentity:
        if not isinstance(data, dict) or "id" not in data:
            raise ChannelError(f"{GATEWAY_INSTANCE_PATH} returned an unexpected body: {data!r}")
        return cls(
            id=str(data["id"]),
            name=str(data.get("name") or ""),
            image=str(data.get("image") or ""),
            env={str(key): str(value) for key, value in (data.get("env") or {}).items()},
            metadata=dict(data.get("metadata") or {}),
            generation=int(data.get("generation") or 0),
            restored_from=data.get("restored_from"),
        )


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _error_fields(status: int, raw: bytes) -> tuple[str, str]:
    """Return (code, message) from an error body, in the workload API's format when it is one."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return "", text[:2000] or f"HTTP {status}"
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        return str(detail.get("code") or ""), str(detail.get("message") or detail)
    if detail is not None:
        return "", json.dumps(detail)[:2000]
    return "", text[:2000]


class ChannelClient:
    """Sends one short HTTP request per connection over the channel's Unix socket."""

    def __init__(
        self, socket_path: str, *, timeout_s: float = 30.0, retry_deadline_s: float = 300.0
    ) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.retry_deadline_s = retry_deadline_s
        # Monotonic time of the first failed workload API request since its last
        # response, or None while the API responds.
        self._workload_failing_since: float | None = None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send a request and return the decoded JSON response, or None for an empty one.

        Raises `WorkloadAPIError` for an HTTP error that retrying cannot fix,
        and `ChannelUnavailableError` once the retry deadline has passed.
        """
        payload = None if body is None else json.dumps(body, allow_nan=False).encode()
        to_workload = not path.startswith("/_gateway/")
        failing_since = time.monotonic()
        backoff = _FIRST_BACKOFF_S
        attempt = 0

        while True:
            attempt += 1
            try:
                status, raw = self._send_once(method, path, payload)
            except (OSError, http.client.HTTPException) as error:
                failure = f"{type(error).__name__}: {error}"
            else:
                code, message = _error_fields(status, raw) if status >= 300 else ("", "")
                if status < 300 or (
                    status not in _RETRYABLE_STATUSES and code != "events_unavailable"
                ):
                    if to_workload:
                        self._workload_failing_since = None
                    if status < 300:
                        return json.loads(raw) if raw.strip() else None
                    raise WorkloadAPIError(method, path, status, code, message)
                failure = f"HTTP {status}: {message}"

            if to_workload:
                if self._workload_failing_since is None:
                    self._workload_failing_since = failing_since
                failing_since = self._workload_failing_since
            failing_for = time.monotonic() - failing_since
            if failing_for + backoff > self.retry_deadline_s:
                raise ChannelUnavailableError(
                    f"{method} {path} over {self.socket_path} failed {attempt} times; "
                    f"requests have failed for {failing_for:.0f} s, and the limit is "
                    f"{self.retry_deadline_s:.0f} s; last error: {failure}"
                )
            # Refusals are expected while the gateway snapshots the instance.
            logger.debug("retrying %s %s in %.2f s after %s", method, path, backoff, failure)
            slept_from = time.monotonic()
            time.sleep(backoff)
            overrun = time.monotonic() - slept_from - backoff
            if overrun > _FREEZE_OVERRUN_S:
                # Only the frozen time is forgiven, so that a host slow enough to
                # overrun a sleep cannot restart the deadline again and again.
                logger.info(
                    "resumed after a freeze of about %.0f s; retrying %s %s", overrun, method, path
                )
                failing_since += overrun
                if to_workload:
                    self._workload_failing_since = failing_since
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _send_once(self, method: str, path: str, payload: bytes | None) -> tuple[int, bytes]:
        connection = _UnixHTTPConnection(self.socket_path, self.timeout_s)
        try:
            headers = {"Connection": "close", "Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def instance(self) -> InstanceIdentity:
        return InstanceIdentity.from_json(self.request("GET", GATEWAY_INSTANCE_PATH))

    def ready(self) -> None:
        self.request("POST", GATEWAY_READY_PATH)
