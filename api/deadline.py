"""Blocking store work, run in a read thread with a deadline: the one way `api` waits on the store.

A network stall (a failover in progress, a congested path) holds a connection without an error
for as long as it lasts: 102 s seen in review. The server's kernel still acknowledges the bytes
and answers keepalives, so no socket option ends it (audit.storage.TCP_LIVENESS). Past the
deadline the request answers 503 and gives its read thread back; the abandoned work finishes or
fails on its own, holding its pooled connection until then.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import anyio
import anyio.to_thread

from audit.storage import StoreUnavailable

T = TypeVar("T")


async def in_read_thread(work: Callable[[], T], seconds: float) -> T:
    """`work()` in one of the read threads (api.app.READ_THREADS), given up after `seconds`."""
    with anyio.move_on_after(seconds):
        return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
    raise StoreUnavailable(f"The store did not answer within {seconds:g} s.")


async def chunks_in_read_thread(chunks: Iterator[str], seconds: float) -> AsyncIterator[str]:
    """A streamed body whose chunks each read the store: each has its own deadline. A chunk
    that misses it ends the stream with an error, never a clean end, so a client cannot take a
    cut export for a whole one."""
    take = functools.partial(next, chunks, None)
    while (chunk := await in_read_thread(take, seconds)) is not None:
        yield chunk
