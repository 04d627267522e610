"""POST /webhooks/clerk: verify the raw bytes with svix, parse, append (SPEC 2)."""

from __future__ import annotations

import asyncio
import binascii
import re
import time

from starlette.requests import ClientDisconnect, Request
from svix.webhooks import Webhook, WebhookVerificationError

from api.errors import ApiError
from api.responses import JSONResponse
from audit.aggregates.delivery import InvalidPayload, parse_delivery
from audit.application import Conflict
from audit.intake import Intake

HEADER_SETS = (
    ("svix-id", "svix-timestamp", "svix-signature"),
    ("webhook-id", "webhook-timestamp", "webhook-signature"),
)
# An entry of `svix-signature`: a scheme (`v1`; `v1a` is Svix's asymmetric one, which no
# secret here verifies) and its signature in padded base64. One not so is malformed (400),
# `v1,abc` included (ENGINEERING.md); a well-formed one that matches no secret is a 401.
_SIGNATURE_ENTRY = re.compile(
    r"^v[0-9]+[a-z]*,(?=.)(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
)
MAX_ID_LENGTH = 256
# Svix gives up on an answer after 15 s; a body still arriving after 10 s is not Svix's.
BODY_TIMEOUT_SECONDS = 10.0


class WebhookReceiver:
    def __init__(
        self,
        secrets: tuple[str, ...],
        intake: Intake,
        max_body_bytes: int,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
    ) -> None:
        self.verifiers = [Webhook(secret) for secret in secrets]
        self.intake = intake
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def handle(self, request: Request) -> JSONResponse:
        svix_id, timestamp, signatures = self._headers(request)
        body = await self._body(request)
        self._verify(body, svix_id, timestamp, signatures)
        try:
            delivery = parse_delivery(
                body,
                svix_id=svix_id,
                svix_timestamp=int(timestamp),
                received_at=time.time_ns() // 1_000_000,
                signature=signatures,
            )
        except InvalidPayload as exc:
            reason = str(exc)  # capitalize() would lower-case the rest ("json", "nan")
            raise ApiError(400, "invalid_payload", f"{reason[:1].upper()}{reason[1:]}.")
        outcome = await self.intake.submit(delivery)
        if isinstance(outcome, Conflict):
            raise ApiError(
                409,
                "svix_id_conflict",
                "This svix-id is already recorded with a different body.",
            )
        return JSONResponse(
            {"status": outcome.status, "event_id": outcome.event_id, "position": outcome.position}
        )

    def _headers(self, request: Request) -> tuple[str, str, str]:
        """The id, timestamp and signatures, each from its `svix-*` header if there is one,
        else its `webhook-*` one, as `svix` itself reads them (taking the whole set from
        `svix-id` alone refused a complete `webhook-*` set beside a stray `svix-id`)."""
        found: list[tuple[str, str]] = []
        for names in zip(*HEADER_SETS, strict=True):
            name = next((name for name in names if name in request.headers), None)
            if name is None:
                raise ApiError(
                    400,
                    "missing_headers",
                    f"The {names[0]} header (or {names[1]}) is required: a delivery carries"
                    " svix-id, svix-timestamp and svix-signature.",
                )
            found.append((name, request.headers[name]))
        (id_name, svix_id), (timestamp_name, timestamp), (signature_name, signature) = found
        if not svix_id or len(svix_id) > MAX_ID_LENGTH or not svix_id.isprintable():
            raise ApiError(400, "invalid_headers", f"The {id_name} header is malformed.")
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
            raise ApiError(
                400, "invalid_headers", f"The {timestamp_name} header is not whole seconds."
            )
        entries = [e for e in signature.split(" ") if _SIGNATURE_ENTRY.match(e)]
        if not entries:
            raise ApiError(400, "invalid_headers", f"The {signature_name} header is malformed.")
        return svix_id, timestamp, " ".join(entries)

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isascii() or not declared.isdigit():
                raise ApiError(400, "invalid_headers", "The Content-Length header is malformed.")
            if int(declared) > self.max_body_bytes:
                raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        try:
            # A slow client (slowloris) may not hold the connection open for ever.
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise self._too_large()
                    chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "client_disconnected", "The client went away mid-body.")
        except TimeoutError:
            raise ApiError(
                408, "request_timeout", f"The body did not arrive within {self.body_timeout} s."
            )
        return b"".join(chunks)

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            "payload_too_large",
            f"The body is larger than {self.max_body_bytes} bytes.",
        )

    def _verify(self, body: bytes, svix_id: str, timestamp: str, signatures: str) -> None:
        headers = {"svix-id": svix_id, "svix-timestamp": timestamp, "svix-signature": signatures}
        for verifier in self.verifiers:
            try:
                verifier.verify(body, headers)  # the bytes as received (SPEC 2)
                return
            except WebhookVerificationError:
                continue
            except (ValueError, binascii.Error):
                raise ApiError(400, "invalid_headers", "The signature header is malformed.")
        raise ApiError(
            401,
            "invalid_signature",
            "No signature matches, or the timestamp is more than 300 s from now.",
        )
