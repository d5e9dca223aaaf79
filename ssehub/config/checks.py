"""Checks of single config values, and the one error type: ``file: key.path: reason``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from redis.connection import parse_url

CHANNEL_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
DEFAULT_GRACE = 10.0
# A family: one `*` among channel-name characters (``user.*``, ``room.*.chat``).
FAMILY_NAME = re.compile(r"^[A-Za-z0-9._-]*\*[A-Za-z0-9._-]*$")


class ConfigError(Exception):
    """A config that cannot be used; ``str()`` is one line: ``file: key.path: reason``."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + reason)


class _Invalid(Exception):
    """Raised by validators; turned into a ConfigError with the key path."""


Check = Callable[[Any], None]


def _positive(value: Any) -> None:
    if value <= 0:
        raise _Invalid(f"expected a positive number, got {value!r}")


def _non_negative(value: Any) -> None:
    if value < 0:
        raise _Invalid(f"expected a non-negative number, got {value!r}")


def _port(value: Any) -> None:
    if not 0 <= value <= 65535:
        raise _Invalid(f"expected a port number 0-65535, got {value!r}")


def _redis_url(value: Any) -> None:
    # A cluster URL lists seed nodes: they are checked with the rest of redis:
    # (see _validate_redis).
    if value.startswith("redis+cluster://"):
        return
    # Everything the broker will take from the URL is checked here, so that a URL
    # that passes --check cannot fail at run time: redis-py's parse_url (port, db,
    # options), and the host as getaddrinfo will encode it (IDNA: "a..b" fails).
    # Reasons never echo the URL, which may hold a password.
    if not re.match(r"^(redis|rediss|unix)://", value):
        raise _Invalid("expected a redis://, rediss://, unix:// or redis+cluster:// URL")
    try:
        params: dict[str, Any] = parse_url(value)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise _Invalid(f"invalid URL: {exc}") from None
    if value.startswith("unix://"):
        where = params.get("path", "")
        if not where:
            raise _Invalid("a unix:// URL needs the socket's path (unix:///run/redis.sock)")
    else:
        where = params.get("host", "")
        try:
            where.encode("idna")
        except UnicodeError as exc:
            raise _Invalid(f"invalid host {where!r}: {exc}") from None
    if "\0" in where:
        raise _Invalid("NUL in the host or path")


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


def _http_url(value: Any) -> None:
    if not re.match(r"^https?://[^/\s]+", value):
        raise _Invalid(f"expected an http:// or https:// URL, got {value!r}")


def _one_of(*allowed: str) -> Check:
    def check(value: Any) -> None:
        if value not in allowed:
            raise _Invalid(f"expected one of {', '.join(allowed)}, got {value!r}")

    return check


def _non_negative_int(value: Any) -> None:
    if value < 0:
        raise _Invalid(f"expected a non-negative integer, got {value!r}")


def _not_empty(value: Any) -> None:
    if not value:
        raise _Invalid("must not be empty")


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_format(value: Any) -> None:
    if value not in LOG_FORMATS:
        raise _Invalid(f"expected one of {', '.join(LOG_FORMATS)}, got {value!r}")


def _log_level(value: Any) -> None:
    if value.upper() not in LOG_LEVELS:
        raise _Invalid(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")


def _check(*checks: Check) -> dict[str, Any]:
    return {"checks": checks}


def _workers(value: Any) -> int:
    """``workers:``: a positive integer, or ``auto`` for the CPUs this process may use."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(f"expected a positive integer or 'auto', got {_describe(value)}")
    return value


# Algorithms an `auth:` section may name, by key family. "none" is never one of them.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = (
    ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),  # an RSA key
    ("ES256", "ES384", "ES512"),  # an EC key
)


def _algorithms(value: Any) -> None:
    known = (HMAC_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS)
    if not value:
        raise _Invalid("expected at least one algorithm")
    for alg in value:
        if not any(alg in family for family in known):
            names = ", ".join(a for family in known for a in family)
            raise _Invalid(f"unknown algorithm {alg!r} (known: {names})")
    if not any(set(value) <= set(family) for family in known):
        # One key verifies them all: mixing families is how algorithm confusion starts.
        raise _Invalid(f"algorithms of one key type only (HS*, RS*/PS* or ES*), got {value!r}")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
