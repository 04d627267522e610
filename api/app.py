"""The ASGI application: webhook intake, health, and the read API."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route

from api.access_log import AccessLog
from api.deadline import ReadThreads
from api.errors import EXCEPTION_HANDLERS
from api.read import read_routes
from api.responses import JSONResponse
from api.webhooks import BODY_TIMEOUT_SECONDS, WebhookReceiver
from audit.application import AuditLog
from audit.config import Settings, load_settings
from audit.intake import COMMIT_TIMEOUT_SECONDS, Intake
from audit.projections.runner import Projector
from audit.runtime import collect_garbage_less_often, configure_logging
from audit.serving import stop_with_spawning_parent

# How long /readyz waits for the store to answer before saying it is not ready.
READINESS_SECONDS = 3.0

# Threads that may run the read API's handlers (and export chunks) at once in one
# worker process (api.deadline). Python runs one of them at a time (the GIL); a second lets one
# compute while the other waits on the database. More only take turns on the GIL and lengthen
# every request: with anyio's default of 40, 8 clients on two workers got history p99 19-24 ms;
# with 2, 11-12 ms (bench/README). More cores are used by more workers. Webhooks do not use these
# threads (audit.intake).
READ_THREADS = 2


def create_app(
    settings: Settings,
    log: AuditLog,
    *,
    projector: Projector | None = None,
    own_log: bool = False,
    body_timeout: float = BODY_TIMEOUT_SECONDS,
    commit_timeout: float = COMMIT_TIMEOUT_SECONDS,
) -> Starlette:
    """Build the service around an open AuditLog (closed on shutdown when `own_log`).

    The `projector` only reports status here: `audit serve` runs the projections in a process
    of their own (audit.serving).
    """
    intake = Intake(log, commit_timeout=commit_timeout)
    receiver = WebhookReceiver(
        settings.signing_secrets, intake, settings.max_body_bytes, body_timeout
    )

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    read_threads = ReadThreads(READ_THREADS)
    # A thread of its own: behind reads that take every read thread (long exports, a table
    # locked by a migration), the readiness probe answered 503 though the store was reachable,
    # and a load balancer would take a busy worker out of service.
    readiness_thread = ReadThreads(1)

    async def readyz(request: Request) -> JSONResponse:
        await readiness_thread.run(log.db.ping, READINESS_SECONDS)
        return JSONResponse({"status": "ready"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            intake.close()
            read_threads.close()
            readiness_thread.close()
            if own_log:
                log.close()

    routes = [
        Route("/webhooks/clerk", receiver.handle, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        *read_routes(),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
        middleware=[Middleware(AccessLog)],
    )
    # Not Starlette's bare 307 to the path without its trailing slash: Svix follows no
    # redirect, so a webhook URL set up with one failed every delivery with an empty answer.
    app.router.redirect_slashes = False
    app.state.log = log
    app.state.read_threads = read_threads
    app.state.projector = projector
    app.state.settings = settings
    return app


def app_from_env() -> Starlette:
    """The factory `audit serve --workers N` hands to uvicorn (each worker builds its own)."""
    configure_logging()
    collect_garbage_less_often()
    stop_with_spawning_parent()
    settings = load_settings()
    log = AuditLog(settings.database)
    return create_app(settings, log, projector=Projector(log), own_log=True)
