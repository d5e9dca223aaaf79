"""Publisher payloads (bytes from Redis) to validated events, or a rejection reason.

Formats, per channel (``format:``):

- ``text``: the whole payload, as UTF-8, is the event's data.
- ``json``: ``{"data": ..., "event": "...", "id": "...", "retry": 5000, "except": ...}``;
  only ``data`` is required; a non-string ``data`` is sent as compact JSON; ``except``
  (a session id or a list) names the sessions the event is not delivered to.

A stream channel's entries (``XADD key * data … [event …] [retry …]``) go through
``parse_entry``: ``data`` is required and read in the channel's format (``text``: as
is; ``json``: a JSON value, a string sent as is and anything else as compact JSON),
``event`` and ``retry`` are optional, any other field is rejected. The entry id is the
event's id.

And on the ``juggernaut`` Redis channel: ``{"channels": [...], "data": ...}`` (or
``"channel": "c"``, and ``except``), Juggernaut's publish format.

A message that breaks a rule is rejected whole, never altered: an ``id`` or
``event`` with a line break would otherwise inject lines into every stream. JSON
text can spell what UTF-8 cannot carry (a lone surrogate, ``"\\ud800"``): such a
message is rejected as ``invalid_utf8``, like undecodable bytes.

An empty ``id`` (``"id": ""``) counts as absent and the hub assigns its own: a browser
whose last id is empty sends no ``Last-Event-ID`` on reconnect, so it would get
neither a replay nor a gap signal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from . import sse

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_SESSION_ID",
    "Event",
    "Rejected",
    "encode_event",
    "parse",
    "parse_entry",
    "not_json",
    "parse_juggernaut",
]

# Ids come back to the hub as Last-Event-ID headers; keep them header-sized.
MAX_ID_LENGTH = 256
_FORBIDDEN = re.compile(r"[\r\n\x00]")
# A \uD800-\uDFFF escape: the only way a JSON text decoded from UTF-8 yields a surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_JSON_FIELDS = frozenset({"data", "event", "id", "retry", "except"})
# `except`: session ids (one, or a list) the event is not delivered to.
MAX_SESSION_ID = 64
MAX_EXCEPT = 1000
_JUGGERNAUT_FIELDS = frozenset({"channels", "channel", "data", "except"})


@dataclass(frozen=True, slots=True)
class Event:
    """One event as the publisher meant it, before the hub assigns an id."""

    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    # Session ids that must not get it (the publisher's ``except``).
    exclude: tuple[str, ...] = ()


class Rejected(Exception):
    """A payload that is not delivered; ``reason`` is a short stable label for logs and metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _decode(payload: bytes, max_bytes: int) -> str:
    if len(payload) > max_bytes:
        raise Rejected("too_large", f"{len(payload)} bytes > {max_bytes}")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", f"byte {exc.start}") from None


def not_json(name: str) -> Any:
    """``parse_constant`` for ``json.loads``: ``NaN``, ``Infinity`` and ``-Infinity``
    are Python's extension, not JSON (RFC 8259); no browser's ``JSON.parse`` reads them."""
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    """A JSON value (RFC 8259) that UTF-8 can carry, or ``Rejected``.

    Nesting deeper than the interpreter's recursion limit (``[`` x 5000 is 5 KB) is
    ``invalid_json`` like any other JSON this hub cannot read: never an exception
    that escapes to the reader and loses the messages behind it.
    """
    try:
        value = json.loads(text, parse_constant=not_json)
    except ValueError as exc:
        raise Rejected("invalid_json", str(exc)) from None
    except RecursionError:
        raise Rejected("invalid_json", "nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):  # rare: surrogate pairs (escaped emoji) or lone ones
        try:
            json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected("invalid_utf8", "lone surrogate in a JSON string") from None
        except (ValueError, RecursionError):
            raise Rejected("invalid_json", "nested too deeply") from None
    return value


def _load_object(payload: bytes, max_bytes: int, fields: frozenset[str]) -> dict[str, Any]:
    """A JSON object with only ``fields`` and at least ``data``."""
    obj = _loads(_decode(payload, max_bytes))
    if not isinstance(obj, dict):
        raise Rejected("invalid_json", "not a JSON object")
    unknown = set(obj) - fields
    if unknown:
        raise Rejected("bad_field", f"unknown fields: {', '.join(sorted(unknown))}")
    if "data" not in obj:
        raise Rejected("bad_field", "data is required")
    return obj


def _data_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # a number past a double's range (1e999) read as infinity
        raise Rejected("invalid_json", "number out of range") from None
    except RecursionError:  # parsed at the edge of the limit, one frame deeper here
        raise Rejected("invalid_json", "nested too deeply") from None


def _field(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Rejected("bad_field", f"{name} must be a string")
    if _FORBIDDEN.search(value):
        raise Rejected("bad_field", f"{name} contains CR, LF or NUL")
    return value


def _except(obj: dict[str, Any]) -> tuple[str, ...]:
    """``except``: absent or null, one session id, or a list of them."""
    value = obj.get("except")
    if value is None:
        return ()
    ids = [value] if isinstance(value, str) else value
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise Rejected("bad_field", "except must be a session id or a list of them")
    if len(ids) > MAX_EXCEPT:
        raise Rejected("bad_field", f"except lists more than {MAX_EXCEPT} sessions")
    if any(len(i) > MAX_SESSION_ID for i in ids):
        raise Rejected("bad_field", f"except: a session id is at most {MAX_SESSION_ID} chars")
    return tuple(dict.fromkeys(ids))


def parse_text(payload: bytes, max_bytes: int) -> Event:
    """The ``text`` format: the whole payload, as UTF-8, is the event's data."""
    return Event(data=_decode(payload, max_bytes))


def parse_json(payload: bytes, max_bytes: int) -> Event:
    """The ``json`` format: an object with ``data`` and optional ``event``, ``id``, ``retry``."""
    obj = _load_object(payload, max_bytes, _JSON_FIELDS)
    event_id = _field(obj, "id") or None  # "" is absent: the hub assigns an id
    if event_id is not None and len(event_id) > MAX_ID_LENGTH:
        raise Rejected("bad_field", f"id longer than {MAX_ID_LENGTH}")
    retry = obj.get("retry")
    if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int) or retry < 0):
        raise Rejected("bad_field", "retry must be a non-negative integer")
    return Event(
        data=_data_text(obj["data"]),
        event=_field(obj, "event"),
        id=event_id,
        retry=retry,
        exclude=_except(obj),
    )


_PARSERS = {"text": parse_text, "json": parse_json}


def parse(fmt: str, payload: bytes, max_bytes: int) -> Event:
    """Parse ``payload`` in the channel's format."""
    return _PARSERS[fmt](payload, max_bytes)


_ENTRY_FIELDS = frozenset({b"data", b"event", b"retry"})


def parse_entry(fmt: str, entry_id: str, fields: dict[bytes, bytes], max_bytes: int) -> Event:
    """A stream entry's fields as an event whose id is the entry id."""
    unknown = set(fields) - _ENTRY_FIELDS
    if unknown:
        names = ", ".join(sorted(k.decode("utf-8", "backslashreplace") for k in unknown))
        raise Rejected("bad_field", f"unknown fields: {names}")
    raw = fields.get(b"data")
    if raw is None:
        raise Rejected("bad_field", "data is required")
    text = _decode(raw, max_bytes)
    if fmt == "json":
        text = _data_text(_loads(text))
    event = None
    if b"event" in fields:
        event = _decode(fields[b"event"], MAX_ID_LENGTH)
        if _FORBIDDEN.search(event):
            raise Rejected("bad_field", "event contains CR, LF or NUL")
    retry = None
    if b"retry" in fields:
        value = fields[b"retry"]
        if not value.isdigit() or len(value) > 10:
            raise Rejected("bad_field", "retry must be a non-negative integer")
        retry = int(value)
    return Event(data=text, event=event, id=entry_id, retry=retry)


def parse_juggernaut(payload: bytes, max_bytes: int) -> tuple[list[str], Event]:
    """Juggernaut's publish format: the target channel names and the event."""
    obj = _load_object(payload, max_bytes, _JUGGERNAUT_FIELDS)
    channels = obj.get("channels", [])
    if "channel" in obj:
        channels = [*channels, obj["channel"]] if isinstance(channels, list) else channels
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise Rejected("bad_field", "channels must be a list of strings")
    if not channels:
        raise Rejected("bad_field", "no channel given")
    event = Event(data=_data_text(obj["data"]), exclude=_except(obj))
    return list(dict.fromkeys(channels)), event


def encode_event(event: Event, event_id: str) -> bytes:
    """``event``'s SSE bytes with ``event_id``; ``Rejected`` when a field cannot be
    sent (a line break in ``event``, a lone surrogate that a JSON escape let through)."""
    try:
        return sse.encode(event.data, event=event.event, id=event_id, retry=event.retry)
    except sse.EncodeError as exc:
        raise Rejected("bad_field", str(exc)) from None
    except UnicodeEncodeError:
        raise Rejected("invalid_utf8", "lone surrogate") from None
