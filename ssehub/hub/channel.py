"""The hub's model: a channel, the streams that follow it (``Subscriber``), the groups
of streams that receive the same bytes, and who is told of each change (``Tap``).

One module because they refer to one another: a channel has its groups, a group its
subscribers, a subscriber its channels and its group.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from ..config import ChannelConfig
from ..core.families import Family
from ..core.history import Budget, Entry, History

__all__ = ["Channel", "Group", "MuxGroup", "Subscriber", "Tap", "pools_of", "streams_of"]


def streams_of(channels: Sequence[Channel]) -> tuple[Channel, ...]:
    """The stream channels among ``channels``, in the order /events ids list them."""
    return tuple(sorted((c for c in channels if c.stream), key=lambda c: c.name))


class Subscriber:
    """One streaming connection, as the hub sees it: a transport, a framing mode and a
    way to end it. Kept small and flat: tens of thousands of these live at once.

    The hub writes event bytes straight to ``transport``; the request handler awaits
    ``waiter``, which resolves with the reason when the hub ends the stream cleanly.
    A client that goes away cancels the handler instead (``handler_cancellation``).
    """

    __slots__ = (
        "channels",
        "chunked",
        "expires",
        "group",
        "meta",
        "reason",
        "session",
        "transport",
        "waiter",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        chunked: bool,
        waiter: asyncio.Future[str],
        channels: Sequence[Channel],
    ) -> None:
        self.transport = transport
        self.channels = channels
        # The hub's group this stream receives bytes with (set on subscribe).
        self.group: Group | None = None
        # HTTP/1.1 bodies are chunked; HTTP/1.0 ones (nginx's default upstream
        # protocol) are raw bytes delimited by the connection's close.
        self.chunked = chunked
        self.waiter = waiter
        self.reason = ""
        # When its token expires (Unix time; 0: public, never): see auth.Access.
        self.expires = 0.0
        # Its session id (told to the page in-band) and what the application attached
        # to it (``sessions.meta_of``): see sessions.py.
        self.session = ""
        self.meta: object = None

    def end(self, reason: str) -> None:
        """End the stream cleanly: the handler writes the last chunk and returns."""
        if not self.reason:
            self.reason = reason
        if not self.waiter.done():
            self.waiter.set_result(reason)

    def abort(self, reason: str) -> None:
        """Drop the connection at once, discarding unsent bytes (for stuck clients)."""
        if not self.reason:
            self.reason = reason
        self.transport.abort()


def pools_of(channels: Sequence[Channel]) -> tuple[str, ...]:
    """Where an /events set of ``channels`` counts in ``limits.max_event_groups``: on
    each private channel or family it holds (``auth: token``), else with every other
    set of public channels only (``""``). Anonymous clients can spend only the latter."""
    private = sorted({c.label for c in channels if c.config.auth == "token"})
    return tuple(private) if private else ("",)


class Group:
    """Subscribers that receive exactly the same bytes."""

    __slots__ = ("chunked", "plain")

    def __init__(self) -> None:
        # transport -> subscriber; iterated on every message, so keyed by the
        # object the loop needs (saves an attribute lookup per write).
        self.chunked: dict[asyncio.Transport, Subscriber] = {}
        # HTTP/1.0 streams: unframed bytes.
        self.plain: dict[asyncio.Transport, Subscriber] = {}

    def __len__(self) -> int:
        return len(self.chunked) + len(self.plain)

    def add(self, sub: Subscriber) -> None:
        (self.chunked if sub.chunked else self.plain)[sub.transport] = sub

    def remove(self, sub: Subscriber) -> bool:
        return (self.chunked if sub.chunked else self.plain).pop(sub.transport, None) is not None

    def subscribers(self) -> list[Subscriber]:
        return [*self.chunked.values(), *self.plain.values()]


class MuxGroup(Group):
    """``/events`` subscribers following the same set of channels."""

    __slots__ = ("channels", "joining", "names", "pools", "streams")

    def __init__(self, channels: Sequence[Channel]) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.names = frozenset(c.name for c in channels)
        # What it counts against in ``limits.max_event_groups``, as it was created.
        self.pools = pools_of(channels)
        # Its stream channels, by name: the order their positions take in its ids.
        self.streams = streams_of(channels)
        # Members still catching up with history: the group outlives its last live
        # member while any remain, so they join the group they were counted in.
        self.joining = 0


class Channel:
    """A listed channel or a live family member: its direct subscribers, its /events
    groups, its history.

    ``label`` names it in metrics: the channel's name, or its family's (``user.*``),
    so that series stay bounded by the config whatever names clients ask for.
    """

    __slots__ = (
        "alone",
        "config",
        "family",
        "flushed_pos",
        "history",
        "holds",
        "label",
        "last_seq",
        "last_write",
        "mux_groups",
        "name",
        "redis",
        "stream",
        "stream_pos",
        "subs",
    )

    def __init__(
        self,
        config: ChannelConfig,
        budget: Budget,
        name: str | None = None,
        family: Family | None = None,
        redis: bytes | None = None,
    ) -> None:
        self.config = config
        self.name = config.name if name is None else name
        self.label = config.name
        self.family = family
        # The Redis channel feeding it, or its stream's key (``stream`` is then true).
        self.stream = bool(config.stream)
        if redis is None:
            redis = (config.stream or config.redis_channel).encode()
        self.redis = redis
        # Stream channels: the entry id of the newest event (the stream's position),
        # and of the newest one written to subscribers (what /events ids carry).
        self.stream_pos = "0-0"
        self.flushed_pos = "0-0"
        # Stream handlers holding this channel (a member lives while any does).
        self.holds = 0
        # The channel list of every direct subscriber: shared, not one per stream.
        self.alone: tuple[Channel] = (self,)
        self.subs = Group()
        self.mux_groups: set[MuxGroup] = set()
        self.history = History(
            config.history, config.history_ttl, config.history_bytes, budget, config.name
        )
        self.last_seq = 0  # hub sequence number of this channel's newest event
        self.last_write = 0.0

    def __len__(self) -> int:
        """Open streams receiving this channel (direct and through /events)."""
        return len(self.subs) + sum(len(g) for g in self.mux_groups)


class Tap(Protocol):
    """Told of every change to the node's numbered state, in order (the workers' feed)."""

    def entry(
        self, channel: Channel, e: Entry, publisher_id: bool, exclude: tuple[str, ...]
    ) -> None: ...
    def member(self, channel: Channel) -> None: ...
    def removed(self, channel: Channel) -> None: ...
    def outage(self, seq: int) -> None: ...
    def stream_failed(self, key: bytes) -> None: ...
