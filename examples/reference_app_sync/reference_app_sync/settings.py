"""Configuration, read from environment variables when this module is imported.

- ``REFERENCE_APP_SYNC_DATABASE_URL``: sync SQLAlchemy URL of the database; default
  ``sqlite:///./reference_app_sync.db`` (pysqlite, in the standard library), so the app runs
  with nothing else installed. For PostgreSQL: ``postgresql+psycopg://user:pw@host/db``.
- ``REFERENCE_APP_SYNC_TIMEZONE``: IANA time zone of the scheduler, used by the nightly cron
  job; default ``UTC``.
- ``REFERENCE_APP_SYNC_BATCH_LIMIT``: items one processing run claims at most; default ``5``.
- ``REFERENCE_APP_SYNC_MAX_ATTEMPTS``: attempts after which a failed item is no longer
  retried; default ``3``.
- ``REFERENCE_APP_SYNC_INTERVAL_SECONDS``: seconds between two processing runs; default
  ``300``.
- ``REFERENCE_APP_SYNC_THREADS``: threads of the scheduler's pool; default ``4``.
- ``REFERENCE_APP_SYNC_CREATE_TABLES``: ``1`` creates missing tables on startup, ``0`` does
  not; default ``1``.

``REFERENCE_APP_SYNC_CREATE_TABLES`` alone is read when the app starts rather than at import
(see :func:`create_tables_on_startup`), so a test suite can switch it off after importing the
app.
"""

from __future__ import annotations

import dataclasses
import os
import zoneinfo

DATABASE_URL_VAR = "REFERENCE_APP_SYNC_DATABASE_URL"
TIMEZONE_VAR = "REFERENCE_APP_SYNC_TIMEZONE"
BATCH_LIMIT_VAR = "REFERENCE_APP_SYNC_BATCH_LIMIT"
MAX_ATTEMPTS_VAR = "REFERENCE_APP_SYNC_MAX_ATTEMPTS"
INTERVAL_SECONDS_VAR = "REFERENCE_APP_SYNC_INTERVAL_SECONDS"
THREADS_VAR = "REFERENCE_APP_SYNC_THREADS"
CREATE_TABLES_VAR = "REFERENCE_APP_SYNC_CREATE_TABLES"

DEFAULT_DATABASE_URL = "sqlite:///./reference_app_sync.db"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated configuration of the service."""

    database_url: str = DEFAULT_DATABASE_URL
    timezone: str = "UTC"
    batch_limit: int = 5
    max_attempts: int = 3
    interval_seconds: int = 300
    threads: int = 4

    @classmethod
    def from_env(cls) -> Settings:
        """Read every setting from its environment variable, falling back to the default."""
        return cls(
            database_url=_env_str(DATABASE_URL_VAR, cls.database_url),
            timezone=_env_timezone(TIMEZONE_VAR, cls.timezone),
            batch_limit=_env_positive_int(BATCH_LIMIT_VAR, cls.batch_limit),
            max_attempts=_env_positive_int(MAX_ATTEMPTS_VAR, cls.max_attempts),
            interval_seconds=_env_positive_int(INTERVAL_SECONDS_VAR, cls.interval_seconds),
            threads=_env_positive_int(THREADS_VAR, cls.threads),
        )


def create_tables_on_startup() -> bool:
    """Whether the app creates missing tables when it starts (``..._CREATE_TABLES``).

    Read at call time, not at import: test suites that build the schema themselves set the
    variable to ``0`` whenever they like.
    """
    return _env_flag(CREATE_TABLES_VAR, default=True)


def _env_str(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def _env_positive_int(name: str, default: int) -> int:
    raw = _env_str(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be at least 1")
    return value


def _env_timezone(name: str, default: str) -> str:
    value = _env_str(name, default)
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{name}={value!r} is not an IANA time zone: use a name like 'UTC' or 'Europe/Paris'"
        ) from None
    return value


def _env_flag(name: str, *, default: bool) -> bool:
    raw = _env_str(name, "1" if default else "0")
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a flag: use 1 or 0")


settings = Settings.from_env()
"""The configuration of this process, read once at import."""
