"""Configuration (SPEC 1), read from the environment in one place.

Bad configuration raises ConfigError, whose message is one line naming the variable; the command
line prints it and exits with status 2.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

SECRET_VARIABLE = "CLERK_WEBHOOK_SIGNING_SECRET"
DATABASE_VARIABLE = "AUDIT_DATABASE_URL"
TOKENS_VARIABLE = "AUDIT_API_TOKENS"
MAX_BODY_VARIABLE = "AUDIT_MAX_BODY_BYTES"

DEFAULT_DATABASE_URL = "sqlite:///var/audit.db"
DEFAULT_MAX_BODY_BYTES = 1_048_576
DEFAULT_POSTGRES_SCHEMA = "clerk_audit"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class ConfigError(Exception):
    """A configuration variable is missing or malformed."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class SqliteDatabase:
    path: Path

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"


@dataclass(frozen=True)
class PostgresDatabase:
    host: str
    port: int
    user: str
    password: str
    dbname: str
    schema: str

    @property
    def url(self) -> str:
        """The URL without its password, fit for logs and error messages."""
        return (
            f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}?schema={self.schema}"
        )


Database = SqliteDatabase | PostgresDatabase


@dataclass(frozen=True)
class Settings:
    signing_secrets: tuple[str, ...]
    database: Database
    api_tokens: tuple[str, ...]
    max_body_bytes: int


def _split(value: str) -> list[str]:
    return [part for part in re.split(r"[\s,]+", value.strip()) if part]


def parse_secrets(value: str) -> tuple[str, ...]:
    secrets = _split(value)
    if not secrets:
        raise ConfigError(SECRET_VARIABLE, "no signing secret is set (expected whsec_...)")
    for secret in secrets:
        if not secret.startswith("whsec_"):
            raise ConfigError(SECRET_VARIABLE, "each secret must start with 'whsec_'")
        encoded = secret.removeprefix("whsec_")
        try:
            # Padding may be left off, as svix (standardwebhooks) allows: it pads the secret.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(SECRET_VARIABLE, "a secret is not valid base64 after 'whsec_'")
        if not key:
            raise ConfigError(SECRET_VARIABLE, "a secret is empty after 'whsec_'")
    return tuple(secrets)


def parse_database_url(value: str) -> Database:
    url = value.strip()
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise ConfigError(DATABASE_VARIABLE, "a sqlite:/// URL needs a file path")
        # Else a file or directory of that odd name, made and used as a new, empty store.
        if "://" in path:
            raise ConfigError(DATABASE_VARIABLE, "one database URL, not several")
        if "?" in path or "#" in path:
            raise ConfigError(
                DATABASE_VARIABLE, "a sqlite:/// URL takes a file path only: no ? or # part"
            )
        return SqliteDatabase(path=Path(path))
    if url.startswith(("postgresql://", "postgres://")):
        if "://" in url.split("://", 1)[1]:
            raise ConfigError(DATABASE_VARIABLE, "one database URL, not several")
        parts = urlsplit(url)
        dbname = unquote(parts.path.lstrip("/"))
        if not parts.hostname or not dbname:
            raise ConfigError(
                DATABASE_VARIABLE, "expected postgresql://user:password@host:port/dbname"
            )
        try:
            port = 5432 if parts.port is None else parts.port
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            raise ConfigError(DATABASE_VARIABLE, "the port is not a number from 1 to 65535")
        if parts.fragment:
            raise ConfigError(DATABASE_VARIABLE, "the URL's # part is not read")
        parameters = parse_qs(parts.query, keep_blank_values=True)
        if len(parameters.get("schema", ())) > 1:
            raise ConfigError(DATABASE_VARIABLE, "the URL names a schema more than once")
        unread = sorted(set(parameters) - {"schema"})
        if unread:  # `sslmode=verify-full` quietly dropped would connect in clear text
            raise ConfigError(
                DATABASE_VARIABLE,
                f"the URL parameter {unread[0]!r} is not read (only schema is); libpq's environment"
                " variables set the others (PGSSLMODE, PGSSLROOTCERT, PGAPPNAME, ...)",
            )
        schema = parameters.get("schema", [DEFAULT_POSTGRES_SCHEMA])[0]
        if not _SCHEMA_NAME.match(schema):
            raise ConfigError(DATABASE_VARIABLE, f"schema {schema!r} is not a plain lowercase name")
        if schema.startswith("pg_") or schema == "information_schema":
            raise ConfigError(DATABASE_VARIABLE, f"schema {schema!r} is PostgreSQL's own")
        return PostgresDatabase(
            host=parts.hostname,
            port=port,
            user=unquote(parts.username or "postgres"),
            password=unquote(parts.password or ""),
            dbname=dbname,
            schema=schema,
        )
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise ConfigError(
        DATABASE_VARIABLE, f"unknown scheme {scheme!r} (expected sqlite:/// or postgresql://)"
    )


def parse_tokens(value: str) -> tuple[str, ...]:
    # Spaces separate too, as for the secrets: a bearer token cannot hold one.
    return tuple(_split(value))


def parse_max_body(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise ConfigError(MAX_BODY_VARIABLE, f"{value!r} is not a whole number of bytes")
    if limit <= 0:
        raise ConfigError(MAX_BODY_VARIABLE, "must be a positive number of bytes")
    return limit


def database_from_env(environ: Mapping[str, str] | None = None) -> Database:
    env = os.environ if environ is None else environ
    # Blank is unset, as `make run` takes it (not an unknown scheme '').
    return parse_database_url(env.get(DATABASE_VARIABLE, "").strip() or DEFAULT_DATABASE_URL)


def load_settings(
    environ: Mapping[str, str] | None = None, *, require_secret: bool = True
) -> Settings:
    """Read every setting; raise ConfigError on the first bad one."""
    env = os.environ if environ is None else environ
    secret_value = env.get(SECRET_VARIABLE, "")
    needed = bool(secret_value.strip()) or require_secret
    secrets = parse_secrets(secret_value) if needed else ()
    return Settings(
        signing_secrets=secrets,
        database=database_from_env(env),
        api_tokens=parse_tokens(env.get(TOKENS_VARIABLE, "")),
        max_body_bytes=parse_max_body(env.get(MAX_BODY_VARIABLE) or str(DEFAULT_MAX_BODY_BYTES)),
    )
