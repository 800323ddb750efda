"""The instance channel: HTTP/1.1 on a Unix socket inside the sandbox, served by the gateway.

Routes:
- `GET /_gateway/instance` returns the instance's identity (`identity()` of the server).
- `POST /_gateway/ready` returns 204 and calls `on_ready`.
- Every other path is proxied to the workload URL with `Authorization: Bearer <token>`.

Each response carries `Connection: close`, so every connection carries one request. A
connection counts as in flight until the client closes its end, so that after `pause()`
the sandbox has no socket open to the gateway and CRIU can dump it.

Another process can run the same server, for example a runner test:

    server = ChannelServer(path, identity=lambda: {...}, workload_url=url, workload_token=t)
    await server.start()
    ...
    await server.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import h11
import httpx

logger = logging.getLogger(__name__)

INSTANCE_PATH = "/_gateway/instance"
READY_PATH = "/_gateway/ready"
MAX_REQUEST_BYTES = 8 * 1024 * 1024
# Request headers the proxy does not forward: hop-by-hop ones, and those it sets itself.
_DROPPED_HEADERS = {
    "host",
    "authorization",
    "connection",
    "keep-alive",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
}
_READ_TIMEOUT_S = 30.0
# How long the server waits for the client to close its end after the response.
_CLOSE_WAIT_S = 2.0

Identity = Callable[[], dict[str, Any]]
ReadyHook = Callable[[], Awaitable[None] | None]


class ChannelServer:
    """Serves one instance's channel socket; `pause()` and `resume()` bracket a snapshot."""

    def __init__(
        self,
        socket_path: Path,
        *,
        identity: Identity,
        on_ready: ReadyHook | None = None,
        workload_url: str | None = None,
        workload_token: str | None = None,
        proxy_timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        label: str = "",
    ) -> None:
        self.socket_path = socket_path
        self.identity = identity
        self.on_ready = on_ready
        self.workload_url = workload_url
        self.workload_token = workload_token
        self.label = label or socket_path.parent.name
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        # Created on the first proxied request, because building its TLS context takes
        # tens of milliseconds that an instance start should not pay.
        self._http: httpx.AsyncClient | None = None
        self._proxy_timeout_s = proxy_timeout_s
        self._transport = transport

    @property
    def accepting(self) -> bool:
        return self._server is not None

    def set_workload(self, url: str | None, token: str | None) -> None:
        """Replace the proxy's target and token, as a restore with new metadata does."""
        self.workload_url = url
        self.workload_token = token

    async def start(self) -> None:
        """Bind the socket (replacing a stale file) and accept connections."""
        if self._server is not None:
            return
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # NOTE: a Unix socket path is limited to 107 bytes, so the socket is bound through
        # /proc/self/fd/<directory fd>/<name>, which stays short however deep the directory is.
        directory_fd = os.open(self.socket_path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            listener.bind(f"/proc/self/fd/{directory_fd}/{self.socket_path.name}")
            os.chmod(self.socket_path, 0o666)
            listener.listen(64)
            self._server = await asyncio.start_unix_server(self._handle, sock=listener)
        except BaseException:
            listener.close()
            raise
        finally:
            os.close(directory_fd)
        logger.debug("channel %s accepting on %s", self.label, self.socket_path)

    async def pause(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, then wait up to `timeout_s` for open connections to close.

        The socket file stays, so clients see ECONNREFUSED and retry. Connections still
        open at the deadline are aborted, because a snapshot must not contain them.
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            logger.warning(
                "channel %s: %d connections still open after %.1f s; aborting them",
                self.label,
                len(self._connections),
                timeout_s,
            )
            for writer in list(self._connections):
                writer.transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 1.0)

    async def resume(self) -> None:
        await self.start()

    async def close(self) -> None:
        """Stop serving, abort open connections and remove the socket file; idempotent."""
        await self.pause(timeout_s=0.5)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    # Connections

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        self._idle.clear()
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            try:
                request, body = await asyncio.wait_for(
                    _read_request(connection, reader), _READ_TIMEOUT_S
                )
            except (h11.RemoteProtocolError, _BodyTooLargeError, TimeoutError) as error:
                status = 413 if isinstance(error, _BodyTooLargeError) else 400
                response = (status, {"detail": f"invalid request on the channel: {error}"})
                await self._send(connection, writer, *_json_response(*response))
                return
            if request is None:
                return
            status, headers, payload = await self._dispatch(request, body)
            await self._send(connection, writer, status, headers, payload)

            # The request stays in flight until the client closes its end (bounded).
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(reader.read(), _CLOSE_WAIT_S)
        except ConnectionError as error:
            logger.debug("channel %s: connection dropped: %s", self.label, error)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._connections.discard(writer)
            if not self._connections:
                self._idle.set()

    async def _send(
        self,
        connection: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, str]],
        payload: bytes,
    ) -> None:
        all_headers = [
            *headers,
            ("content-length", str(len(payload))),
            ("connection", "close"),
        ]
        try:
            data = connection.send(h11.Response(status_code=status, headers=all_headers))
        except h11.LocalProtocolError:
            return
        writer.write(data or b"")
        writer.write(connection.send(h11.Data(data=payload)) or b"")
        writer.write(connection.send(h11.EndOfMessage()) or b"")
        await writer.drain()

    async def _dispatch(
        self, request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        method = request.method.decode()
        target = request.target.decode()
        path = target.split("?", 1)[0]

        if path == INSTANCE_PATH and method == "GET":
            return _json_response(200, self.identity())
        if path == READY_PATH and method == "POST":
            if self.on_ready is not None:
                result = self.on_ready()
                if result is not None:
                    await result
            logger.info("channel %s: runner reported ready", self.label)
            return 204, [], b""
        if path.startswith("/_gateway/"):
            return _json_response(
                404,
                {"detail": f"{method} {path} is not a gateway route; "
                 f"use GET {INSTANCE_PATH} or POST {READY_PATH}"},
            )  # fmt: skip
        return await self._proxy(method, target, request.headers, body)

    async def _proxy(
        self, method: str, target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        if not self.workload_url:
            return _json_response(
                503,
                {"detail": "this instance has no VMFLOW_WORKLOAD_URL, so the channel cannot "
                 "proxy to the workload API; pass it in the instance's env"},
            )  # fmt: skip
        forwarded = {
            name.decode(): value.decode()
            for name, value in headers
            if name.decode().lower() not in _DROPPED_HEADERS
        }
        if self.workload_token:
            forwarded["Authorization"] = f"Bearer {self.workload_token}"
        url = self.workload_url.rstrip("/") + target
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._proxy_timeout_s, transport=self._transport)
        try:
            response = await self._http.request(method, url, headers=forwarded, content=body)
        except httpx.TimeoutException as error:
            logger.warning("channel %s: %s %s timed out: %r", self.label, method, url, error)
            return _json_response(504, {"detail": f"the workload API timed out: {error!r}"})
        except httpx.TransportError as error:
            logger.warning("channel %s: %s %s failed: %r", self.label, method, url, error)
            return _json_response(502, {"detail": f"the workload API is unreachable: {error!r}"})
        passed_headers = [
            (name, value)
            for name, value in response.headers.items()
            if name.lower() in ("content-type", "retry-after", "location")
        ]
        return response.status_code, passed_headers, response.content


class _BodyTooLargeError(Exception):
    pass


async def _read_request(
    connection: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            connection.receive_data(data)
            if not data and request is None:
                return None, b""
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BYTES:
                raise _BodyTooLargeError(f"body larger than {MAX_REQUEST_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


def _json_response(status: int, body: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    return status, [("content-type", "application/json")], json.dumps(body).encode()
