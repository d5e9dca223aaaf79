"""Log set-up: ``text`` lines for people, or ``json`` lines for log shippers.

The code logs one line per event worth knowing, with its facts as ``key=value`` pairs
in the message (``message rejected channel=chat reason=invalid_utf8``), which reads
well as text and greps well. The json format keeps that single convention rather
than a second one (``extra=``): it splits the formatted message into ``msg`` (the
words before the first pair) and one field per pair, beside the stable ``ts``,
``level`` and ``logger``. A value runs to the next `` key=``, so it may hold spaces.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp import web

from .auth import redact
from .config import LoggingConfig

__all__ = ["ACCESS_LOGGER", "enable_access_log", "JsonFormatter", "TEXT_FORMAT", "fields", "setup"]

ACCESS_LOGGER = "ssehub.access"

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


_PAIR = re.compile(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_.]*)=")
_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?\d+\.\d+")
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})


def _value(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def fields(message: str) -> tuple[str, dict[str, Any]]:
    """Split ``words key=value key=value`` into the words and the pairs."""
    matches = list(_PAIR.finditer(message))
    if not matches:
        return message, {}
    out: dict[str, Any] = {}
    for m, nxt in zip(matches, [*matches[1:], None], strict=True):
        end = nxt.start() if nxt is not None else len(message)
        key = m.group(1)
        # A pair may not overwrite the envelope: ts/level/logger/msg stay stable.
        out[f"field_{key}" if key in _RESERVED else key] = _value(message[m.end() : end])
    return message[: matches[0].start()].strip(), out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the pairs."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        message = record.getMessage()
        msg, pairs = fields(message)
        ts = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": msg,
            **pairs,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(
    config: LoggingConfig, level: str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Configure the root logger from the config; ``level`` (``--log-level``) wins if given."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
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
        'request remote=%s method=%s path=%s status=%d agent="%s"',
        request.remote,
        request.method,
        redact(request.path_qs),  # a ?token= must never reach a log
        response.status,
        request.headers.get("User-Agent", ""),
    )


def enable_access_log(app: web.Application) -> None:
    """Log one line per request as its response starts.

    Not aiohttp's access log: that one writes when a handler returns, and a stream
    whose client leaves is cancelled instead, so most streams would never appear.
    Logged at the start, every stream does, with its status.
    """
    app.on_response_prepare.append(_log_response)
