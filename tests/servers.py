"""Serving a test's ASGI app with uvicorn on a free 127.0.0.1 port, in the loop or a thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import pytest
import uvicorn
from fastapi import FastAPI


@contextlib.asynccontextmanager
async def serve_app(
    app: FastAPI, *, lifespan: Literal["on", "off"] = "off", start_timeout_s: float = 10
) -> AsyncIterator[str]:
    """Run an ASGI app on uvicorn on a free 127.0.0.1 port; yield its base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[listener]))
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        assert not task.done(), "test server stopped during start-up"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def serve_app_in_thread(
    app: FastAPI, *, start_timeout_s: float = 15, timeout_graceful_shutdown: int | None = None
) -> Iterator[str]:
    """Run an ASGI app on uvicorn in a daemon thread on a free 127.0.0.1 port; yield its base URL.

    The thread serves synchronous fixtures and tests, which have no event loop to serve from.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=timeout_graceful_shutdown,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive():
                pytest.fail("test server stopped during start-up")
            if time.monotonic() > deadline:
                pytest.fail(f"test server did not start within {start_timeout_s} s")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        listener.close()
