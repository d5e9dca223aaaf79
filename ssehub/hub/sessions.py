"""Session ids, the meta a client carries, and who hears of streams coming and going.

Every stream gets a **session id**, told to the page first thing in its stream as the
named event ``ssehub-session`` (no ``id:`` field, so ``Last-Event-ID`` is untouched).
Ids are unique across processes, nodes and restarts without any coordination: a
random prefix per process (48 bits) and a counter, e.g. ``Xk3v_9aQ.1c``.

A stream's **meta** is what the application attached to the client: on a private
channel the JWT's ``sub`` (and ``meta.claim`` when configured), otherwise the
``meta`` query parameter (at most ``meta.max_bytes``; JSON when it parses as JSON,
else the string), never written to a log.

The hub tells a ``Roster`` of every stream it registers and of every one it lets go
(exactly once each, with the reason); the roster hands the channels that need it --
all of them with ``events.enabled``, those with ``presence: true`` -- to a ``Sink``:
the Redis writer (``presence.Reporter``) in a single process, the feed to the main
process in a worker.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from ..config import MetaConfig
from ..core import sse

if TYPE_CHECKING:
    from ..http.auth import Grant
    from .subscriber import Subscriber

__all__ = ["SESSION_EVENT", "Roster", "Sink", "meta_of", "session_event"]

# The named event carrying a stream's session id, first in the stream.
SESSION_EVENT = "ssehub-session"
# The query parameter a public stream's meta comes in.
META_PARAM = "meta"


def session_event(session: str) -> bytes:
    """The stream's first event: its session id, with no id of its own."""
    return sse.encode(session, event=SESSION_EVENT)


def meta_of(request: web.Request, config: MetaConfig, grant: Grant | None) -> Any:
    """What rides along with this client's events: from its token, else from ``?meta=``.

    Raises 400 for a ``meta`` parameter over ``config.max_bytes`` or not valid text;
    the answer never quotes it.
    """
    if grant is not None:
        meta: dict[str, Any] = {"sub": grant.sub}
        if config.claim and config.claim in grant.payload:
            meta[config.claim] = grant.payload[config.claim]
        return meta
    value = request.query.get(META_PARAM)
    if value is None:
        return None
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # percent-encoded bytes that are not UTF-8
        raise web.HTTPBadRequest(text="meta must be UTF-8 text\n") from None
    if size > config.max_bytes:
        raise web.HTTPBadRequest(text=f"meta is larger than {config.max_bytes} bytes\n")
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    try:  # "\ud800" in JSON text: a value no UTF-8 consumer could read back
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise web.HTTPBadRequest(text="meta must be UTF-8 text\n") from None
    return parsed


class Sink(Protocol):
    """Where a stream's comings and goings go, per channel."""

    def join(self, channel: str, session: str, meta: Any, presence: bool) -> None: ...
    def leave(self, channel: str, session: str, meta: Any, reason: str, presence: bool) -> None: ...


class Roster:
    """The hub's hook: one call per stream registered and per stream let go.

    Costs a look at each channel's flags per connect and disconnect; the sink batches
    (one Redis pipeline per batch), so nothing here waits or touches the delivery path.
    """

    __slots__ = ("events", "sink")

    def __init__(self, sink: Sink, events: bool) -> None:
        self.sink = sink
        self.events = events

    def joined(self, sub: Subscriber) -> None:
        for channel in sub.channels:
            presence = channel.config.presence
            if self.events or presence:
                self.sink.join(channel.name, sub.session, sub.meta, presence)

    def left(self, sub: Subscriber, reason: str) -> None:
        for channel in sub.channels:
            presence = channel.config.presence
            if self.events or presence:
                self.sink.leave(channel.name, sub.session, sub.meta, reason, presence)
