"""Blocking store work, run in a few read threads with a deadline: the one way `api` waits on the
store (the read routes, each chunk of an export, `/readyz`).

A network stall (a failover in progress, a congested path) holds a connection without an error
for as long as it lasts: 102 s seen in review. The server's kernel still acknowledges the bytes
and answers keepalives, so no socket option ends it (audit.storage.TCP_LIVENESS). Past the
deadline the request answers 503. Work that has not started by then never does; work that has
goes on to its end in its thread, which stays taken meanwhile: a slow or stalled store then ties
up this worker's read threads and its reads answer 503, but never more than `count` connections,
so the webhooks, which share the pool, go on. (anyio's threads, given up on cancel, gave their
place back at once: each retry started another read, and the reads took every pooled
connection.)
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import anyio

from audit.storage import StoreUnavailable

T = TypeVar("T")


class ReadThreads:
    """One worker process's read threads (api.app.READ_THREADS), and the deadline of each use."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._executor: ThreadPoolExecutor | None = None  # from the first use after each close
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Reads submitted that no thread has taken up yet."""
        return self._waiting

    async def run(self, work: Callable[[], T], seconds: float) -> T:
        """`work()` in a read thread, given up after `seconds`, waiting for a thread included."""

        def start() -> T:
            with self._lock:
                self._waiting -= 1
            return work()

        if self._executor is None:  # an app's lifespan may run more than once (tests do)
            self._executor = ThreadPoolExecutor(self._count, thread_name_prefix="read")
        with self._lock:
            self._waiting += 1
        future = self._executor.submit(start)
        with anyio.move_on_after(seconds):
            try:
                return await asyncio.wrap_future(future)
            finally:
                if future.cancel():  # never started, and now never will
                    with self._lock:
                        self._waiting -= 1
        raise StoreUnavailable(
            f"The read did not finish within {seconds:g} s ({self.waiting} more waiting for"
            " a read thread)."
        )

    async def chunks(self, chunks: Iterator[str], seconds: float) -> AsyncIterator[str]:
        """A streamed body whose chunks each read the store: each has its own deadline. A chunk
        that misses it ends the stream with an error, never a clean end, so a client cannot take
        a cut export for a whole one."""
        take = functools.partial(next, chunks, None)
        while (chunk := await self.run(take, seconds)) is not None:
            yield chunk

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
