"""The sample Clerk payloads bundled with the package, and a sender that signs and posts them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import httpx
from svix.webhooks import Webhook


def sample_bodies() -> Iterator[tuple[str, bytes]]:
    """(event type, raw body) for every bundled sample, in name order."""
    folder = resources.files("audit") / "samples"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            yield entry.name.removesuffix(".json"), entry.read_bytes()


def sample_svix_id(event_type: str) -> str:
    """Fixed per sample, so sending the samples twice records them once."""
    return f"msg_sample_{event_type.replace('.', '_')}"


def signed_headers(secret: str, svix_id: str, body: bytes, when: datetime | None = None) -> dict:
    moment = when or datetime.now(tz=UTC)
    # svix's hint says str; it signs bytes as they are (standardwebhooks 1.3, pyproject.toml).
    signature = Webhook(secret).sign(svix_id, moment, body)  # type: ignore[arg-type]
    return {
        "svix-id": svix_id,
        "svix-timestamp": str(int(moment.timestamp())),
        "svix-signature": signature,
        "content-type": "application/json",
    }


def send_samples(url: str, secret: str) -> dict[str, Any]:
    """POST every sample, signed now; return counts by answer status."""
    counts: dict[str, Any] = {"recorded": 0, "duplicate": 0, "failed": []}
    with httpx.Client(timeout=30) as client:
        for event_type, body in sample_bodies():
            svix_id = sample_svix_id(event_type)
            response = client.post(url, content=body, headers=signed_headers(secret, svix_id, body))
            status = _status_of(response) if response.status_code == 200 else None
            if status in ("recorded", "duplicate"):
                counts[status] += 1
            else:
                counts["failed"].append((event_type, response.status_code, response.text[:200]))
    return counts


def _status_of(response: httpx.Response) -> str | None:
    try:
        answer = response.json()
    except ValueError:  # not this service answering
        return None
    return answer.get("status") if isinstance(answer, dict) else None


def describe(counts: dict[str, Any]) -> str:
    lines = [f"recorded {counts['recorded']}, duplicate {counts['duplicate']}"]
    failed = counts["failed"]
    answers = {(status, text) for _, status, text in failed}
    if len(failed) > 1 and len(answers) == 1:  # one cause: one line, not one per sample
        [(status, text)] = answers
        hint = " (is CLERK_WEBHOOK_SIGNING_SECRET the server's?)" if status == 401 else ""
        lines.append(f"failed all {len(failed)}: {status} {text}{hint}")
    else:
        lines += [f"failed {t}: {status} {text}" for t, status, text in failed]
    return "\n".join(lines)


__all__ = ["describe", "sample_bodies", "sample_svix_id", "send_samples", "signed_headers"]
