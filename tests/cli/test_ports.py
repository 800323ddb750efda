"""Port probes of `vmflow dev` and `vmflow demo`: TIME-WAIT is free, a listener is not."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from vmflow.cli.demo import _port_or_free
from vmflow.cli.stack import StackError, _check_port_free


@pytest.fixture
def time_wait_port() -> Iterator[int]:
    """Yield a port whose only socket is a closed connection in TIME-WAIT.

    The server side closes first, so its end of the connection, on the
    listening port, enters TIME-WAIT for about a minute. The listener sets
    SO_REUSEADDR as servers such as uvicorn do, and Linux allows a new bind
    beside a TIME-WAIT socket only when both sockets set it.
    """
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port: int = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    yield port


def test_demo_port_in_time_wait_is_kept(time_wait_port: int) -> None:
    assert _port_or_free(time_wait_port) == time_wait_port


def test_dev_port_in_time_wait_is_free(time_wait_port: int) -> None:
    _check_port_free(time_wait_port, "the API", "--api-port")


def test_listening_port_is_not_free() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        assert _port_or_free(port) != port
        with pytest.raises(StackError, match=f"port {port} for the API"):
            _check_port_free(port, "the API", "--api-port")
