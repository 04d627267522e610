"""Group commit's hand-over between the event loop and the writer thread, through a real store."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Sequence

import pytest

from audit.aggregates.delivery import Delivery
from audit.application import AuditLog, Duplicate, Outcome, Recorded
from audit.config import Database
from audit.intake import Intake, record_each
from tests.domain_factories import sample
from tests.test_projections import sample_deliveries

ANSWER_SECONDS = 30  # a guard against hanging, not a timing: answers come in milliseconds


class PausingLog(AuditLog):
    """The real store; `record` waits, when asked to, until the test lets it go on."""

    name = AuditLog.name  # eventsourcing names the tables after the application

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self.pause = False
        self.entered = threading.Event()
        self.go_on = threading.Event()

    def record(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        if self.pause:
            self.entered.set()
            self.go_on.wait(ANSWER_SECONDS)
        return super().record(deliveries)


@pytest.fixture
def pausing_log(database: Database):  # type: ignore[no-untyped-def]
    log = PausingLog(database)
    try:
        yield log
    finally:
        log.close()


def test_a_handler_cancelled_while_its_delivery_commits_leaves_the_writer_answering(
    pausing_log: PausingLog,
) -> None:
    """A client that goes away mid-commit cancels its handler. Its delivery is still recorded
    (Svix's retry is then a duplicate) and the writer goes on answering the others. (With a
    concurrent.futures.Future per delivery, the writer's set_result raised on the cancelled
    future and the writer thread died: every later delivery waited for ever.)"""
    first, second = sample_deliveries()[:2]
    intake = Intake(pausing_log)

    async def scenario() -> tuple[Outcome, Outcome]:
        pausing_log.pause = True
        waiting = asyncio.create_task(intake.submit(first))
        await asyncio.to_thread(pausing_log.entered.wait, ANSWER_SECONDS)
        waiting.cancel()
        pausing_log.pause = False
        pausing_log.go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        after = await asyncio.wait_for(intake.submit(second), ANSWER_SECONDS)
        retried = await asyncio.wait_for(intake.submit(first), ANSWER_SECONDS)
        return after, retried

    try:
        after, retried = asyncio.run(scenario())
    finally:
        intake.close()
    assert isinstance(after, Recorded)
    assert isinstance(retried, Duplicate)


def test_every_waiter_of_a_failed_batch_hears_why(pausing_log: PausingLog) -> None:
    intake = Intake(pausing_log)
    pausing_log.close()  # the store is gone: recording raises

    async def scenario() -> list[BaseException | Outcome]:
        submissions = [intake.submit(d) for d in sample_deliveries()[:3]]
        return await asyncio.wait_for(
            asyncio.gather(*submissions, return_exceptions=True), ANSWER_SECONDS
        )

    try:
        answers = asyncio.run(scenario())
    finally:
        intake.close()
    assert len(answers) == 3
    assert all(isinstance(answer, Exception) for answer in answers)


def test_a_delivery_no_store_can_take_fails_alone_in_its_batch(log: AuditLog) -> None:
    """`parse_delivery` refuses a lone surrogate; a Delivery that got past it anyway names a
    stream no id can be derived for. Its batch then goes one delivery at a time: the others
    are recorded, and only it fails (it took the whole batch down with it, as 500s)."""
    good = sample("user.created", svix_id="msg_good_1", id="user_good")
    bad = dataclasses.replace(good, svix_id="msg_bad", data={**good.data, "id": "user_\ud800"})
    other = sample("session.created", svix_id="msg_good_2")
    answers = record_each(log, [good, bad, other])
    assert isinstance(answers[0], Recorded) and isinstance(answers[2], Recorded)
    assert isinstance(answers[1], UnicodeError)
    assert [type(a) for a in record_each(log, [good, other])] == [Duplicate, Duplicate]
