"""`audit serve --workers N` answers keep-alive requests without Nagle's delay."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from audit.serving import tcp_listening_socket


def test_the_workers_listening_socket_gives_connections_tcp_nodelay() -> None:
    config = uvicorn.Config("api.app:app_from_env", host="127.0.0.1", port=0, workers=2)
    listening = tcp_listening_socket(config.bind_socket())
    assert listening.proto == socket.IPPROTO_TCP

    async def accepted_nodelay() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        # As each uvicorn worker does with the socket it inherits.
        server = await asyncio.start_server(on_connect, sock=listening)
        async with server:
            _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
            nodelay = await asyncio.wait_for(accepted, 5)
            writer.close()
        return nodelay

    assert asyncio.run(accepted_nodelay()) != 0


def test_uvicorns_own_socket_would_not() -> None:
    """The reason for tcp_listening_socket: without it, asyncio leaves Nagle on."""
    config = uvicorn.Config("api.app:app_from_env", host="127.0.0.1", port=0, workers=2)
    sock = config.bind_socket()
    try:
        assert sock.proto == 0
    finally:
        sock.close()
