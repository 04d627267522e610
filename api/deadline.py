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
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any, TypeVar

import anyio

from audit.storage import StoreUnavailable

T = TypeVar("T")


class ReadThreads:
    """One worker process's read threads (api.app.READ_THREADS), and the deadline of each use.

    Daemon threads: a read stuck in a stall must not keep the process from exiting when it is
    told to stop (concurrent.futures' threads are joined at exit, so a restart during a stall
    hung until the stall ended).
    """

    def __init__(self, count: int) -> None:
        self._count = count
        self._queue: _WorkQueue | None = None  # the threads' work, from the first use after a close
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Reads submitted that no thread has taken up yet."""
        return self._waiting

    def _submit(self, work: Callable[[], T]) -> Future[T]:
        if self._queue is None:  # an app's lifespan may run more than once (tests do)
            self._queue = SimpleQueue()
            for number in range(self._count):
                name = f"read-{number}"
                threading.Thread(target=_serve, args=(self._queue,), name=name, daemon=True).start()
        future: Future[T] = Future()
        self._queue.put((future, work))
        return future

    async def run(self, work: Callable[[], T], seconds: float) -> T:
        """`work()` in a read thread, given up after `seconds`, waiting for a thread included."""

        def start() -> T:
            with self._lock:
                self._waiting -= 1
            return work()

        with self._lock:
            self._waiting += 1
        future = self._submit(start)
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
        """The threads end once the work queued so far is done (or given up)."""
        if self._queue is not None:
            for _ in range(self._count):
                self._queue.put(None)
            self._queue = None


_WorkQueue = SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None]


def _serve(queue: _WorkQueue) -> None:
    while (item := queue.get()) is not None:
        _run(*item)
        del item  # else held while the thread waits: a disconnected export's body, say


def _run(future: Future[T], work: Callable[[], T]) -> None:
    if not future.set_running_or_notify_cancel():
        return  # given up before it started
    try:
        result = work()
    except StopIteration as exc:  # asyncio cannot carry it: the request would hang
        error = RuntimeError("a read raised StopIteration")
        error.__cause__ = exc
        future.set_exception(error)
    except BaseException as exc:  # the awaiting request's to raise
        future.set_exception(exc)
    else:
        future.set_result(result)
