"""The webhook receiver a team would write from Clerk's guide: verify, INSERT, answer.

One table (`id text primary key, body text, received_at`), one autocommit INSERT per request,
`ON CONFLICT DO NOTHING` for redeliveries. Run it with uvicorn:

    BASELINE_DATABASE=postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dmy_schema \\
    CLERK_WEBHOOK_SIGNING_SECRET=whsec_... \\
    uvicorn --app-dir bench baseline_app:app --host 127.0.0.1 --port 8001

`bench/ingest.py` starts it as `python bench/baseline_app.py --host H --port P --workers N`, which
starts uvicorn the way `audit serve` does.

`BASELINE_DATABASE` is a libpq URI (PostgreSQL, through a psycopg connection pool per worker) or
`sqlite:///path.db` (sqlite3, one connection per thread, WAL like the service's own store).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from svix.webhooks import Webhook, WebhookVerificationError

TABLE = "baseline_webhooks"
CREATE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} "
    "(id text PRIMARY KEY, body text NOT NULL, received_at {timestamp} NOT NULL)"
)
POOL_SIZE = 10


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def insert(self, svix_id: str, body: str) -> bool: ...


class PostgresStore:
    """A psycopg pool; each insert is its own autocommitted statement."""

    def __init__(self, conninfo: str) -> None:
        self.pool = AsyncConnectionPool(
            conninfo,
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            kwargs={"autocommit": True},
            open=False,
        )

    async def open(self) -> None:
        await self.pool.open(wait=True)
        async with self.pool.connection() as conn:
            await conn.execute(CREATE.format(timestamp="timestamptz"))

    async def close(self) -> None:
        await self.pool.close()

    async def insert(self, svix_id: str, body: str) -> bool:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                f"INSERT INTO {TABLE} (id, body, received_at) VALUES (%s, %s, now()) "
                "ON CONFLICT (id) DO NOTHING",
                (svix_id, body),
            )
            return cursor.rowcount == 1


class SqliteStore:
    """sqlite3 in autocommit mode, one connection per threadpool thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            self.local.conn = conn
        return conn

    def _create(self) -> None:
        self._connection().execute(CREATE.format(timestamp="text"))

    async def open(self) -> None:
        await run_in_threadpool(self._create)

    async def close(self) -> None:
        return None

    def _insert(self, svix_id: str, body: str) -> bool:
        cursor = self._connection().execute(
            f"INSERT INTO {TABLE} (id, body, received_at) "
            "VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) ON CONFLICT (id) DO NOTHING",
            (svix_id, body),
        )
        return cursor.rowcount == 1

    async def insert(self, svix_id: str, body: str) -> bool:
        return await run_in_threadpool(self._insert, svix_id, body)


def store_from_env() -> Store:
    url = os.environ["BASELINE_DATABASE"]
    if url.startswith("sqlite:///"):
        return SqliteStore(url.removeprefix("sqlite:///"))
    return PostgresStore(url)


def create_app() -> Starlette:
    webhook = Webhook(os.environ["CLERK_WEBHOOK_SIGNING_SECRET"])
    store = store_from_env()

    async def receive(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            webhook.verify(body, dict(request.headers))
        except WebhookVerificationError:
            return JSONResponse({"error": "invalid signature"}, status_code=400)
        svix_id = request.headers["svix-id"]
        inserted = await store.insert(svix_id, body.decode("utf-8"))
        status = "recorded" if inserted else "duplicate"
        return JSONResponse({"status": status, "event_id": svix_id})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        try:
            yield
        finally:
            await store.close()

    routes = [
        Route("/webhooks/clerk", receive, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


app = create_app()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="the baseline receiver under uvicorn")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run("baseline_app:app", host=args.host, port=args.port, workers=args.workers)


if __name__ == "__main__":
    main()
