"""`audit serve`, except that uvicorn's listening socket is marked IPPROTO_TCP (an experiment).

uvicorn binds its socket with `socket.socket(family=AF_INET)`, whose `proto` is 0; asyncio sets
TCP_NODELAY only on accepted sockets whose `proto` is IPPROTO_TCP. With `--workers 1` asyncio
binds the socket itself (proto 6) and all is well; with `--workers 2` or more uvicorn's socket is
used, Nagle's algorithm holds back the body of each keep-alive response until the client's
delayed ACK, and every request takes 40+ ms. `bench/query.py --nodelay` starts the server through
this wrapper to show what fixing that (and then using both cores) would give.

    python bench/serve_nodelay.py serve --workers 2 --port 8000
"""

from __future__ import annotations

import socket
import sys

from uvicorn.config import Config

from audit.cli import main

_bind_socket = Config.bind_socket


def bind_socket(self: Config) -> socket.socket:
    sock = _bind_socket(self)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    return sock


if __name__ == "__main__":
    Config.bind_socket = bind_socket  # type: ignore[method-assign]
    sys.exit(main())
