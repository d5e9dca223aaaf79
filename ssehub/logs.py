"""Log set-up: ``text`` lines for people, or ``json`` lines for log shippers.

Every log call in ssehub has a fixed phrase as its message and its facts as structured
fields: ``log.warning("message rejected", extra=fields(channel=name, reason=reason))``.
Client and publisher text never goes into the message, and no field is ever parsed out
of a formatted message (a User-Agent of ``x" status=500`` would forge one).

The formatters are the one place where values are made safe: credentials are
redacted from every string (``redact``: a ``token``/``meta`` query value, and anything
shaped like a JWT), every string is cut to ``MAX_VALUE`` characters (with a marker
saying how much was dropped), and the text format quotes and escapes, JSON-string
style, any value with whitespace, ``"``, ``=`` or a character that is not printable,
so one record is always one line. They apply to every record, other libraries' too.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import urllib.parse
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp import web

from .config import LoggingConfig

__all__ = [
    "ACCESS_LOGGER",
    "JsonFormatter",
    "MAX_VALUE",
    "TextFormatter",
    "enable_access_log",
    "fields",
    "redact",
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


REDACTED = "REDACTED"
# Query parameters no log line shows: the token (http/auth.py's QUERY_PARAM), and the
# client's meta (personal data, hub/sessions.py).
HIDDEN_PARAMS = frozenset({"token", "meta"})

# A query parameter inside any text (a request target, or a message quoting one). Any of
# ``?``, ``&`` and ``;`` starts one: ``?x=1?token=…`` or ``?x=1;token=…`` must not pass as
# the value of ``x``. The value runs to the next ``&`` (or a space, quote or ``#``),
# so a hidden value hides everything up to there, separators it holds included.
_PARAM = re.compile(r"([?&;])([^?&;=\s'\"]*)=([^&\s'\"#]*)")
# A JWT, or any part of one: base64url JSON starts with ``eyJ`` (``{"``), and its
# segments are joined by dots. A word of its own, so that ``heyJude`` stays.
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}")


def _hidden(name: str) -> bool:
    return urllib.parse.unquote_plus(name).strip() in HIDDEN_PARAMS


def redact(text: str) -> str:
    """``text`` with every credential replaced: a ``token`` or ``meta`` query value,
    however its name is spelt (``%74oken`` decodes to ``token`` too) or introduced
    (``?``, ``&``, ``;``), and any JWT-shaped word (a token in a header, a cookie, a
    fragment of one that aiohttp quotes in an error)."""
    if "=" in text:
        text = _redact_params(text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    return text


def _redact_params(text: str) -> str:
    out = []
    pos = 0
    while True:
        m = _PARAM.search(text, pos)
        if m is None:
            out.append(text[pos:])
            return "".join(out)
        # Up to the value: the separator, the name and "=".
        out.append(text[pos : m.start(3)])
        if _hidden(m.group(2)):
            out.append(REDACTED)
            pos = m.end()
        else:
            # A visible value is scanned again from its start: ``?x=1?token=…``
            # holds a second parameter inside what looked like x's value.
            pos = m.start(3)


def fields(**kw: Any) -> dict[str, Any]:
    """Structured facts for a log record: pass as ``extra=fields(channel=..., reason=...)``."""
    return {"fields": kw}


def _bounded(value: Any) -> Any:
    """A field value fit for a log line: numbers and booleans as they are, the rest as a
    string, credentials redacted, of at most ``MAX_VALUE`` characters."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = redact(value if isinstance(value, str) else str(value))
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
        text = redact(super().formatException(ei))
        return "\n".join("    " + line for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        """A stack (``stack_info=True``), redacted as everything else is."""
        return redact(super().formatStack(stack_info))


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
            out["exc"] = redact(self.formatException(record.exc_info))
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
