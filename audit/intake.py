"""Group commit: concurrent deliveries gathered into one transaction.

Handlers hand their delivery to one writer thread and wait for its answer; the writer takes
whatever has queued up since its last commit and records it all in one `AuditLog.record` call. Each
delivery is still answered only after the transaction holding it has committed. Under load this
turns N transactions (each serialised by the events-table lock on PostgreSQL) into one.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future

from audit.aggregates.delivery import Delivery
from audit.application import AuditLog, Outcome

MAX_BATCH = 500


class Intake:
    def __init__(self, log: AuditLog, *, max_batch: int = MAX_BATCH) -> None:
        self.log = log
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Delivery, Future[Outcome]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="audit-intake", daemon=True)
        self._thread.start()

    async def submit(self, delivery: Delivery) -> Outcome:
        """Record one delivery; returns once it is committed (or raises why it was not)."""
        future: Future[Outcome] = Future()
        self._queue.put((delivery, future))
        return await asyncio.wrap_future(future)

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

    def _commit(self, batch: list[tuple[Delivery, Future[Outcome]]]) -> None:
        try:
            outcomes = self.log.record([delivery for delivery, _ in batch])
        except BaseException as exc:  # every waiter must hear why, whatever it was
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            future.set_result(outcome)
