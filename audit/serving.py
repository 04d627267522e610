"""Starting uvicorn with several worker processes, with Nagle's algorithm off.

uvicorn binds the shared listening socket as `socket.socket(AF_INET)`, whose `proto` is 0, and
asyncio turns TCP_NODELAY on only for accepted sockets whose `proto` is IPPROTO_TCP. With one
worker asyncio binds the socket itself and all is well; with several, each keep-alive response
waited for the client's delayed ACK, about 40 ms a request (found by bench/query.py). Here the
same socket is rebound with its protocol named, and the workers inherit that.
"""

from __future__ import annotations

import socket

import uvicorn
from uvicorn.supervisors import Multiprocess


def tcp_listening_socket(sock: socket.socket) -> socket.socket:
    """The same bound socket, as one that says it is TCP (so asyncio sets TCP_NODELAY)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
        return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    return sock


def run_workers(config: uvicorn.Config) -> None:
    """What `uvicorn.run(..., workers=N)` does, on a socket whose accepted connections are
    TCP_NODELAY."""
    sock = tcp_listening_socket(config.bind_socket())
    Multiprocess(config, sockets=[sock]).run()
