"""The ASGI application: webhook intake, health, and the read API."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.errors import EXCEPTION_HANDLERS
from api.webhooks import WebhookReceiver
from audit.application import AuditLog
from audit.config import Settings, load_settings
from audit.intake import Intake


def create_app(settings: Settings, log: AuditLog, *, own_log: bool = False) -> Starlette:
    """Build the service around an open AuditLog (closed on shutdown when `own_log`)."""
    intake = Intake(log)
    receiver = WebhookReceiver(settings.signing_secrets, intake, settings.max_body_bytes)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        await run_in_threadpool(log.db.ping)
        return JSONResponse({"status": "ready"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            intake.close()
            if own_log:
                log.close()

    routes = [
        Route("/webhooks/clerk", receiver.handle, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.log = log
    app.state.settings = settings
    return app


def app_from_env() -> Starlette:
    """The factory `audit serve` hands to uvicorn (each worker process builds its own)."""
    settings = load_settings()
    return create_app(settings, AuditLog(settings.database), own_log=True)
