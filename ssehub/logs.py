"""Log set-up: ``text`` lines for people, or ``json`` lines for log shippers.

Every log call in ssehub has a fixed phrase as its message and its facts as structured
fields: ``log.warning("message rejected", extra=fields(channel=name, reason=reason))``.
Client and publisher text never goes into the message, and no field is ever parsed out
of a formatted message (a User-Agent of ``x" status=500`` would forge one).

The formatters are the one place where values are made safe: every string is cut to
``MAX_VALUE`` characters (with a marker saying how much was dropped), and the text
format quotes and escapes, JSON-string style, any value with whitespace, ``"``, ``=``
or a character that is not printable, so one record is always one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp import web

from .config import LoggingConfig
from .http.auth import redact

__all__ = [
    "ACCESS_LOGGER",
    "JsonFormatter",
    "MAX_VALUE",
    "TextFormatter",
    "enable_access_log",
    "fields",
    "setup",
]

ACCESS_LOGGER = "ssehub.access"

# Characters kept of any string value; the rest is replaced by a marker.
MAX_VALUE = 200

# The envelope of a json line: fields of these names are renamed, never overwrite it.
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})
# Characters that make a text value need quotes (non-printable ones are found apart).
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')
# Characters json.dumps(ensure_ascii=False) leaves raw although they are not printable
# (DEL, C1 controls, U+2028, lone surrogates, format characters...).
_NON_ASCII = re.compile(r"[^\x20-\x7e]")


def fields(**kw: Any) -> dict[str, Any]:
    """Structured facts for a log record: pass as ``extra=fields(channel=..., reason=...)``."""
    return {"fields": kw}


def _bounded(value: Any) -> Any:
    """A field value fit for a log line: numbers and booleans as they are, the rest as a
    string of at most ``MAX_VALUE`` characters."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_VALUE:
        return f"{text[:MAX_VALUE]}...[{len(text) - MAX_VALUE} more chars]"
    return text


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    if c.isprintable():
        return c
    n = ord(c)
    if n > 0xFFFF:  # as JSON spells it: a surrogate pair
        n -= 0x10000
        return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"
    return f"\\u{n:04x}"


def _json(value: Any) -> str:
    """JSON text that is printable (non-printable characters escaped, always encodable)."""
    return _NON_ASCII.sub(_escape_char, json.dumps(value, ensure_ascii=False, default=str))


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    given = getattr(record, "fields", None)
    if not isinstance(given, dict):
        return {}
    return {f"field_{k}" if k in _RESERVED else str(k): _bounded(v) for k, v in given.items()}


def _text_value(value: Any) -> str:
    if not isinstance(value, str):
        return _json(value)
    if value == "" or _NEEDS_QUOTES.search(value) or not value.isprintable():
        return _json(value)
    return value


def _timestamp(record: logging.LogRecord) -> str:
    ts = datetime.fromtimestamp(record.created, UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """``<asctime> <LEVEL> <logger> <msg> key=value ...``: one line per record."""

    def __init__(self) -> None:
        # The format string only makes logging fill in asctime; formatMessage builds the line.
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line without the traceback: the message escaped, then the fields."""
        msg = _bounded(record.message)
        if not msg.isprintable():  # another library's message, with client text in it
            msg = _json(msg)[1:-1]
        line = f"{record.asctime} {record.levelname} {record.name} {msg}"
        pairs = _record_fields(record)
        if pairs:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in pairs.items())
        return line

    def formatException(self, ei: Any) -> str:
        """A traceback, every line indented so that none can pass for a record of its own."""
        return "\n".join("    " + line for line in super().formatException(ei).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": _bounded(record.getMessage()),
            **_record_fields(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _json(out)


def setup(
    config: LoggingConfig, level: str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Configure the root logger from the config; ``level`` (``--log-level``) wins if given."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel((level or config.level).upper())
    # Asked-for access lines appear even when the level hides other INFO lines.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if config.access_log else logging.NOTSET)
    return handler


_access = logging.getLogger(ACCESS_LOGGER)


async def _log_response(request: web.Request, response: web.StreamResponse) -> None:
    _access.info(
        "request",
        extra=fields(
            remote=request.remote,
            method=request.method,
            path=redact(request.path_qs),  # a ?token= must never reach a log
            status=response.status,
            agent=request.headers.get("User-Agent", ""),
        ),
    )


def enable_access_log(app: web.Application) -> None:
    """Log one line per request as its response starts.

    Not aiohttp's access log: that one writes when a handler returns, and a stream
    whose client leaves is cancelled instead, so most streams would never appear.
    Logged at the start, every stream does, with its status.
    """
    app.on_response_prepare.append(_log_response)
