"""Group commit: concurrent deliveries gathered into one transaction.

Handlers hand their delivery to one writer thread and wait for its answer; the writer takes
whatever has queued up since its last commit and records it all in one `AuditLog.record` call. Each
delivery is still answered only after the transaction holding it has committed. Under load this
turns N transactions (each serialised by the events-table lock on PostgreSQL) into one.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Sequence

from audit.aggregates.delivery import Delivery
from audit.application import AuditLog, Outcome
from audit.storage import StoreUnavailable

MAX_BATCH = 500
# Svix gives up on an answer after 15 s. A commit that takes longer than this (a lock someone
# holds on the events table, a disk stall) is answered 503 so Svix retries; if it lands after
# all, the retry is answered as a duplicate.
COMMIT_TIMEOUT_SECONDS = 10.0

# A delivery, the event loop its handler waits on, and the future it waits for.
_Item = tuple[Delivery, asyncio.AbstractEventLoop, "asyncio.Future[Outcome]"]
# A waiter and what it hears: an outcome, or why there is none.
_Answer = tuple["asyncio.Future[Outcome]", Outcome | BaseException]


class Intake:
    def __init__(
        self,
        log: AuditLog,
        *,
        max_batch: int = MAX_BATCH,
        commit_timeout: float = COMMIT_TIMEOUT_SECONDS,
    ) -> None:
        self.log = log
        self.max_batch = max_batch
        self.commit_timeout = commit_timeout
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="audit-intake", daemon=True)
        self._thread.start()

    async def submit(self, delivery: Delivery) -> Outcome:
        """Record one delivery; returns once it is committed (or raises why it was not, or
        StoreUnavailable when the commit has taken `commit_timeout`)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Outcome] = loop.create_future()
        # A timer on the future, not asyncio.wait_for, which costs 6 us more a delivery.
        timer = loop.call_later(self.commit_timeout, _give_up, waiter)
        self._queue.put((delivery, loop, waiter))
        try:
            return await waiter
        finally:
            timer.cancel()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Item]) -> None:
        answers: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
        for (_, loop, waiter), answer in zip(
            batch, record_each(self.log, [delivery for delivery, _, _ in batch]), strict=True
        ):
            answers.setdefault(loop, []).append((waiter, answer))
        # One wake-up of each event loop for the whole batch, rather than one per delivery.
        for loop, settled in answers.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
                loop.call_soon_threadsafe(_settle, settled)


def record_each(log: AuditLog, deliveries: Sequence[Delivery]) -> list[Outcome | BaseException]:
    """Record deliveries together; answer each with its outcome, or why it has none.

    A failure that is not the store's (a delivery that no store could take) is not every
    delivery's: the batch is then recorded one delivery at a time, so that only its own fails.
    """
    try:
        return list(log.db.once_more_if_lost(lambda: log.record(deliveries)))
    except StoreUnavailable as exc:  # the same for each: retry later
        return [exc] * len(deliveries)
    except Exception as exc:
        if len(deliveries) == 1:
            return [exc]
        # else: one at a time, below
    except BaseException as exc:
        return [exc] * len(deliveries)
    answers: list[Outcome | BaseException] = []
    for delivery in deliveries:
        try:
            answers += log.record([delivery])
        except BaseException as exc:
            answers.append(exc)
    return answers


def _give_up(waiter: asyncio.Future[Outcome]) -> None:
    if not waiter.done():  # the writer answers it no more (`_settle` skips a done one)
        waiter.set_exception(StoreUnavailable("the store did not commit the delivery in time"))


def _settle(answers: Sequence[_Answer]) -> None:
    for waiter, answer in answers:
        if waiter.done():  # its handler was cancelled (the client went away)
            continue
        if isinstance(answer, StopIteration):  # which a future refuses to hold
            answer = RuntimeError(f"recording failed: {answer!r}")
        if isinstance(answer, BaseException):
            waiter.set_exception(answer)
        else:
            waiter.set_result(answer)
