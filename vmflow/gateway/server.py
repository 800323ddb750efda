"""Running the gateway with uvicorn, on a fixed port or, for tests, on a free one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from vmflow.gateway.app import create_app
from vmflow.gateway.service import Gateway
from vmflow.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)


class GatewayServer:
    """The gateway on uvicorn inside the running event loop; `url` is set once it listens.

        async with GatewayServer(settings) as server:
            client = ComputeClient(server.url, auth_token=token)

    With `settings.port == 0` the OS chooses a free port on `settings.host`. Leaving the
    `async with` block deletes every instance; `stop()` alone leaves them running, as a
    restart of the gateway does.
    """

    def __init__(self, settings: GatewaySettings, *, gateway: Gateway | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, gateway=gateway)
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.state.gateway
        return gateway

    async def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.settings.host, self.settings.port))
        host, port = listener.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[listener]))
        while not self._server.started:
            if self._task.done():
                listener.close()
                await self._task
                raise RuntimeError("the gateway server stopped during start-up")
            await asyncio.sleep(0.01)
        self.url = f"http://{host}:{port}"
        logger.info("gateway listening on %s", self.url)

    async def stop(self, *, delete_instances: bool = False) -> None:
        """Stop serving; instances keep running unless `delete_instances` is set."""
        if self._server is None or self._task is None:
            return
        if delete_instances:
            await self.gateway.delete_all_instances()
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = None

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(delete_instances=True)


def serve(settings: GatewaySettings) -> None:
    """Run the gateway in the foreground until interrupted."""
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
