"""A Svix-like sender: at-least-once delivery of signed events, as Svix does it.

Each delivery is retried on any non-2xx answer or transport error, on a schedule (Svix's is
5 s, 5 min, 30 min, ...; tests shorten it), re-signed with the current time on every attempt.
Some deliveries are sent again after they were acknowledged (Svix's duplicates), and the order
is shuffled. The report says what was acknowledged, and every status seen.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from audit.samples import signed_headers

SHORT_SCHEDULE = (0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0)


@dataclass(frozen=True)
class Message:
    svix_id: str
    body: bytes


@dataclass
class Report:
    acknowledged: set[str] = field(default_factory=set)
    answers: Counter[str] = field(default_factory=Counter)  # "recorded", "duplicate", ...
    statuses: Counter[str] = field(default_factory=Counter)  # "200", "503", "ConnectError"
    attempts: int = 0
    redeliveries: int = 0
    gave_up: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def summary(self) -> str:
        return (
            f"attempts={self.attempts} acknowledged={len(self.acknowledged)}"
            f" redeliveries={self.redeliveries} gave_up={len(self.gave_up)}"
            f" answers={dict(self.answers)} statuses={dict(sorted(self.statuses.items()))}"
        )


class SvixLikeSender:
    def __init__(
        self,
        urls: Sequence[str],
        secret: str,
        *,
        schedule: Sequence[float] = SHORT_SCHEDULE,
        timeout: float = 15.0,
        concurrency: int = 8,
        duplicate_rate: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.urls = list(urls)
        self.secret = secret
        self.schedule = schedule
        self.timeout = timeout
        self.concurrency = concurrency
        self.duplicate_rate = duplicate_rate
        self.random = random.Random(seed)
        self._local = threading.local()

    def send_all(self, messages: Sequence[Message]) -> Report:
        order = list(messages)
        self.random.shuffle(order)
        again = {m.svix_id for m in order if self.random.random() < self.duplicate_rate}
        report = Report()
        with ThreadPoolExecutor(self.concurrency) as pool:
            for index, message in enumerate(order):
                pool.submit(self._deliver, message, message.svix_id in again, index, report)
        return report

    def _client(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(timeout=self.timeout)
        return client

    def _deliver(self, message: Message, send_twice: bool, index: int, report: Report) -> None:
        acknowledged = self._attempts(message, index, report)
        if acknowledged and send_twice:
            with report.lock:
                report.redeliveries += 1
            self._attempts(message, index + 1, report)

    def _attempts(self, message: Message, index: int, report: Report) -> bool:
        for attempt, delay in enumerate(self.schedule):
            time.sleep(delay)
            url = self.urls[(index + attempt) % len(self.urls)]
            headers = signed_headers(self.secret, message.svix_id, message.body)
            try:
                response = self._client().post(url, content=message.body, headers=headers)
                status = str(response.status_code)
                answer = response.json().get("status") if response.is_success else None
            except (httpx.TransportError, ValueError) as exc:
                status, answer = type(exc).__name__, None
            with report.lock:
                report.attempts += 1
                report.statuses[status] += 1
                if answer is not None:
                    report.answers[answer] += 1
                    report.acknowledged.add(message.svix_id)
            if answer is not None:
                return True
        with report.lock:
            report.gave_up.append(message.svix_id)
        return False
