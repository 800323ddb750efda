"""Serving a test's ASGI app with uvicorn on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Literal

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
