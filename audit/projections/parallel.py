"""Catching several projections up at once, in processes (`audit rebuild --all`).

In one process the projections take turns, and each waits for its own statements: while the
database inserts a batch, no Python runs. Split into one group of projections per core, each
group in a process of its own, the cores stay busier. A group steps its projections in rounds,
sharing each batch's decoding; each group decodes the stream itself.

bench/rebuild.py-style runs, 200,000 events, PostgreSQL, 2 cores: 65.4 s in one process, 62.9 s
with a process per projection (three decodings on two cores), 54.4 s with `objects` alone and
`events` with `timelines`, which is how `groups` splits them.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.queues import Queue
from typing import Any

from audit.application import AuditLog
from audit.config import Database, PostgresDatabase
from audit.projections.base import Projection
from audit.projections.runner import BATCH_SIZE, Projector

POLL_SECONDS = 0.5


def groups(projections: Sequence[Projection], cores: int) -> list[list[str]]:
    """The projections' names in at most `cores` groups of about equal `rebuild_seconds`
    (the largest first, each to the lightest group so far)."""
    count = max(1, min(cores, len(projections)))
    loads = [0.0] * count
    names: list[list[str]] = [[] for _ in range(count)]
    for projection in sorted(projections, key=lambda p: -p.rebuild_seconds):
        lightest = loads.index(min(loads))
        loads[lightest] += projection.rebuild_seconds
        names[lightest].append(projection.name)
    return [group for group in names if group]


def worth_processes(database: Database) -> bool:
    """Whether projections catch up faster in processes here: with more than one core, on
    PostgreSQL. (SQLite lets one writer in at a time, and a step writes throughout.)"""
    return isinstance(database, PostgresDatabase) and (os.cpu_count() or 1) > 1


class CatchUpFailed(RuntimeError):
    """A group's process failed; its traceback is in the message."""


def catch_up_in_processes(
    database: Database,
    name_groups: Sequence[Sequence[str]],
    progress: Callable[[str, int], None] | None = None,
    *,
    batch_size: int = BATCH_SIZE,
) -> None:
    """`Projector.catch_up` of each group of projections in a process of its own (spawned, so
    that it shares no connection with this one); returns when all have finished, and raises
    CatchUpFailed naming each group that did not."""
    context = multiprocessing.get_context("spawn")
    messages: Queue[tuple[str, str, Any]] = context.Queue()
    workers = {
        ",".join(group): context.Process(
            target=_catch_up,
            args=(database, list(group), batch_size, messages),
            name="audit-catch-up",
        )
        for group in name_groups
    }
    errors: dict[str, str] = {}
    for worker in workers.values():
        worker.start()
    try:
        while any(worker.is_alive() for worker in workers.values()):
            _take(messages, progress, errors, wait=POLL_SECONDS)
        _take(messages, progress, errors, wait=None)  # what the last ones said on exit
    finally:
        for worker in workers.values():
            worker.join()  # a Ctrl-C reached them too: each rolls back its step and exits
    failed = {group: w.exitcode for group, w in workers.items() if w.exitcode != 0}
    if failed:
        raise CatchUpFailed(
            "\n".join(
                f"{group}: exited with status {code}\n{errors.get(group, '')}".rstrip()
                for group, code in failed.items()
            )
        )


def _take(
    messages: Queue[tuple[str, str, Any]],
    progress: Callable[[str, int], None] | None,
    errors: dict[str, str],
    *,
    wait: float | None,
) -> None:
    """Handle the messages there are, after waiting up to `wait` seconds for the first."""
    try:
        kind, name, value = messages.get(timeout=wait) if wait else messages.get_nowait()
        while True:
            if kind == "progress" and progress is not None:
                progress(name, value)
            elif kind == "failed":
                errors[name] = value
            kind, name, value = messages.get_nowait()
    except queue.Empty:
        return


def _catch_up(
    database: Database, names: list[str], batch_size: int, messages: Queue[tuple[str, str, Any]]
) -> None:
    """One process's work: bring a group of projections (and their builds) up to date."""
    try:
        log = AuditLog(database)
        try:
            projector = Projector(log, batch_size=batch_size)
            projector.catch_up(
                *(projector.projections[name] for name in names),
                progress=lambda name, count: messages.put(("progress", name, count)),
            )
        finally:
            log.close()
    except BaseException:
        messages.put(("failed", ",".join(names), traceback.format_exc()))
        raise SystemExit(1) from None
