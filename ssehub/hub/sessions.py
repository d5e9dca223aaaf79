"""Session ids, the meta a client carries, and who hears of streams coming and going.

Every stream gets a **session id**, told to the page first thing in its stream as the
named event ``ssehub-session`` (no ``id:`` field, so ``Last-Event-ID`` is untouched).
Ids are unique across processes, nodes and restarts without any coordination (see
core/ids.py). ``Sessions`` finds a stream by its id, for a publisher's ``except``.

A stream's **meta** is what the application attached to the client: on a private
channel the JWT's ``sub`` (and ``meta.claim`` when configured), otherwise the
``meta`` query parameter (at most ``meta.max_bytes``; JSON when it parses as strict
JSON (RFC 8259: no ``NaN`` or ``Infinity``, numbers within a double's range), else the
string), never written to a log. Every event and presence answer carrying it is
strict JSON, so one client's meta never breaks ``JSON.parse`` for anyone else.

The hub tells a ``Roster`` of every stream it registers and of every one it lets go
(exactly once each, with the reason); the roster hands the channels that need it --
all of them with ``events.enabled``, those with ``presence: true`` -- to a ``Sink``:
the Redis writer (``presence.Reporter``) in a single process, the feed to the main
process in a worker.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from ..config import MetaConfig
from ..core import sse
from ..core.messages import not_json
from .channel import Subscriber

__all__ = [
    "META_PARAM",
    "SESSION_EVENT",
    "BadMeta",
    "Claims",
    "Roster",
    "Sessions",
    "Sink",
    "meta_of",
    "session_event",
]

# The named event carrying a stream's session id, first in the stream.
SESSION_EVENT = "ssehub-session"
# The query parameter a public stream's meta comes in.
META_PARAM = "meta"


def session_event(session: str) -> bytes:
    """The stream's first event: its session id, with no id of its own."""
    return sse.encode(session, event=SESSION_EVENT)


class Claims(Protocol):
    """A verified token, as far as meta goes: its ``sub`` and every claim."""

    sub: Any
    payload: dict[str, Any]


class BadMeta(ValueError):
    """A ``meta`` parameter the hub will not carry; the message says why (never quoting it)."""


def meta_of(claims: Claims | None, value: str | None, config: MetaConfig) -> Any:
    """What rides along with this client's events: from its token, else from ``value``
    (the ``meta`` query parameter).

    Raises ``BadMeta`` for a ``meta`` parameter over ``config.max_bytes`` or not valid text.
    """
    if claims is not None:
        meta: dict[str, Any] = {"sub": claims.sub}
        if config.claim and config.claim in claims.payload:
            meta[config.claim] = claims.payload[config.claim]
        try:  # PyJWT reads NaN and 1e999 in a token's claims: none may reach a page
            json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (ValueError, RecursionError):
            raise BadMeta("the token's claims for meta are not JSON") from None
        return meta
    if value is None:
        return None
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # percent-encoded bytes that are not UTF-8
        raise BadMeta("meta must be UTF-8 text") from None
    if size > config.max_bytes:
        raise BadMeta(f"meta is larger than {config.max_bytes} bytes")
    try:
        parsed = json.loads(value, parse_constant=not_json)
        # Written back as strict JSON too: a number past a double's range (1e999,
        # read as infinity) makes this a plain string, like text that is no JSON.
        json.dumps(parsed, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" in JSON text: no UTF-8 consumer could read it
        raise BadMeta("meta must be UTF-8 text") from None
    except (ValueError, RecursionError):
        return value
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


class Sessions:
    """Streams by session id, for ``except``; and the roster, if any.

    A session is **opened** when its id is issued (the page may know it from then on),
    **registered** with its stream (``joined``: live, or still catching up) and let go
    once (``left``, or ``close`` for one that never registered). An event whose
    ``except`` names a session that is not live yet -- waiting on Redis before it
    registers, or catching up -- is kept out of its replay (``skips``); one that is
    live steps out of its group for that event (see Fanout.deliver).
    """

    __slots__ = ("_subs", "_waiting", "roster")

    def __init__(self) -> None:
        self._subs: dict[str, Subscriber] = {}
        # Opened, not live yet: the seqs its replay must skip (None: none so far).
        self._waiting: dict[str, set[int] | None] = {}
        self.roster: Roster | None = None

    def __len__(self) -> int:
        return len(self._subs)

    @property
    def waiting(self) -> int:
        """Sessions opened that are not live yet (waiting on Redis, or catching up)."""
        return len(self._waiting)

    def get(self, session: str) -> Subscriber | None:
        """The registered stream with this session id, if any."""
        return self._subs.get(session)

    def open(self, session: str) -> None:
        """``session`` was issued to a page: from now on an ``except`` may name it."""
        self._waiting[session] = None

    def close(self, session: str) -> None:
        """A session that never registered (or was let go already) is over."""
        if session not in self._subs:
            self._waiting.pop(session, None)

    def joined(self, sub: Subscriber, live: bool) -> None:
        """A stream registered, ``live`` or catching up: index its session, report it."""
        if sub.session:
            self._subs[sub.session] = sub
            if live:
                self._waiting.pop(sub.session, None)
            else:
                self._waiting.setdefault(sub.session, None)
        if self.roster is not None:
            self.roster.joined(sub)

    def went_live(self, sub: Subscriber) -> None:
        """``sub`` caught up: events that except it now step it out of its group."""
        self._waiting.pop(sub.session, None)

    def skips(self, session: str) -> set[int] | None:
        """The seqs of events that excepted ``session`` while it was not live yet."""
        return self._waiting.get(session)

    def left(self, sub: Subscriber, reason: str) -> None:
        """A registered stream was let go (``reason``), exactly once."""
        if sub.session:
            self._subs.pop(sub.session, None)
            self._waiting.pop(sub.session, None)
        if self.roster is not None:
            self.roster.left(sub, reason)

    def exclude(self, sessions: tuple[str, ...], seq: int) -> list[Subscriber]:
        """The live streams an event (``seq``) excepting ``sessions`` must skip; those
        not live yet note it, to skip it in their replay."""
        out = []
        for session in sessions:
            if session in self._waiting:
                skip = self._waiting[session]
                if skip is None:
                    skip = self._waiting[session] = set()
                skip.add(seq)
            else:
                sub = self._subs.get(session)
                if sub is not None:
                    out.append(sub)
        return out
