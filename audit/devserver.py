"""`make run`: a local service on SQLite with a development secret and token kept under var/."""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import sys
from pathlib import Path

from audit import cli
from audit.config import ConfigError, parse_secrets, parse_tokens

VAR = Path("var")


def _kept(name: str, make: callable) -> str:  # type: ignore[valid-type]
    path = VAR / name
    if path.exists():
        return path.read_text().strip()
    VAR.mkdir(exist_ok=True)
    value = make()
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__)
    parser.add_argument("--port", type=int, default=8000, help="default 8000 (make run PORT=...)")
    port = parser.parse_args(argv).port
    secret = _kept(
        "dev-signing-secret", lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    )
    token = _kept("dev-api-token", lambda: "dev_" + secrets.token_urlsafe(24))
    defaults = {
        "CLERK_WEBHOOK_SIGNING_SECRET": secret,
        "AUDIT_API_TOKENS": token,
        "AUDIT_DATABASE_URL": "sqlite:///var/audit.db",
    }
    for name, value in defaults.items():
        if not os.environ.get(name, "").strip():  # set but empty (`VAR= make run`) is unset
            os.environ[name] = value
    print("clerk-audit development server")
    print(f"  signing secret: {os.environ['CLERK_WEBHOOK_SIGNING_SECRET']}")
    print(f"  API token:      {os.environ['AUDIT_API_TOKENS']}")
    print(f"  database:       {os.environ['AUDIT_DATABASE_URL']}")
    # What the server will take: the environment's, where it overrides var/.
    with contextlib.suppress(ConfigError):  # else serve stops with one line naming it
        secret = parse_secrets(os.environ["CLERK_WEBHOOK_SIGNING_SECRET"])[0]
    token = next(iter(parse_tokens(os.environ["AUDIT_API_TOKENS"])), token)
    print("Try it, from another shell:")
    base = f"http://127.0.0.1:{port}"
    url = "" if port == 8000 else f" --url {base}/webhooks/clerk"
    print(f"  CLERK_WEBHOOK_SIGNING_SECRET={secret} .venv/bin/audit send-samples{url}")
    print(f"  curl -H 'Authorization: Bearer {token}' {base}/v1/events")
    sys.stdout.flush()
    return cli.main(["serve", "--host", "127.0.0.1", "--port", str(port)])


if __name__ == "__main__":
    sys.exit(main())
