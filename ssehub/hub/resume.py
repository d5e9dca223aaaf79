"""Positions: what an ``id:`` says about where a client is, and catching up from Redis.

Three kinds of id reach the hub as ``Last-Event-ID`` (see core/ids.py): a position
in this process's numbering, a Redis Stream entry id on a stream channel, and an
``/events`` id carrying both. At most ``MAX_STREAMS_PER_EVENTS`` stream channels per
``/events`` connection keep the last under 256 characters.

``catch_up_from_redis`` serves a stream channel's client whose position is older than
the hub's cache: it pages through the channel's window of entries read from Redis
(backfill.py: one read for every client resuming near the same position) until the
position reaches what the hub holds in memory, where the synchronous seam of
``Hub.subscribe`` takes over.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ..config import Config
from ..core import sse
from ..core.ids import compact, just_before, parse_stream_id, split_mux_id, stream_order
from ..core.messages import Rejected, encode_event, parse_entry
from .backfill import Backfill, Encode
from .channel import Channel, streams_of
from .stats import Stats

if TYPE_CHECKING:
    from ..redis.streams import StreamSource

__all__ = [
    "GAP_EVENT",
    "MAX_STREAMS_PER_EVENTS",
    "Source",
    "catch_up_from_redis",
    "gap_event",
    "resume_streams",
]

# The named event that tells a client it missed events it cannot get back.
GAP_EVENT = "ssehub-gap"

# Bytes of events a resume from Redis reads per XRANGE page (about).
PAGE_BYTES = 64 * 1024

# Stream channels one /events connection may follow (the id carries each position).
MAX_STREAMS_PER_EVENTS = 16


class Source(Protocol):
    """What a catch-up from Redis needs of the hub."""

    @property
    def stats(self) -> Stats: ...
    @property
    def config(self) -> Config: ...
    @property
    def streams(self) -> StreamSource | None: ...
    @property
    def replay_bound(self) -> int: ...
    @property
    def backfill(self) -> Backfill: ...
    def mux_event(self, channel: Channel, raw: bytes, event_id: bytes) -> bytes: ...


def gap_event(channel: str, reason: str, last_event_id: str | None) -> bytes:
    """The ``ssehub-gap`` event: ``channel`` missed events since ``last_event_id``."""
    data = {"channel": channel, "reason": reason, "lastEventId": last_event_id}
    return sse.encode(json.dumps(data, separators=(",", ":"), allow_nan=False), event=GAP_EVENT)


def cached(channel: Channel, entry_id: str) -> bool:
    """True when the hub can resume ``channel`` from ``entry_id`` out of memory."""
    return entry_id == channel.stream_pos or channel.history.seq_of(entry_id) is not None


def encoder(hub: Source, channel: Channel) -> Encode:
    """How ``channel``'s entries read from Redis become events (b"" for one its format
    rejects: counted and logged when the reader met it)."""
    fmt = channel.config.format
    limit = hub.config.limits.max_message_bytes

    def encode(entry_id: str, fields: dict[bytes, bytes]) -> bytes:
        try:
            return encode_event(parse_entry(fmt, entry_id, fields, limit), entry_id)
        except Rejected:
            return b""

    return encode


async def catch_up_from_redis(
    hub: Source,
    streams: StreamSource,
    channel: Channel,
    position: str,
    write: Callable[[list[bytes], list[str | None]], Awaitable[None]],
    last_event_id: str,
    page_bytes: int,
) -> str:
    """Bring a stream channel's client from ``position`` to where the hub's memory
    takes over, writing what it missed with ``write(events, entry ids)`` (one call per
    page, so one write to the client; entry id None for the gap event; it waits for
    the client to read); returns the new position.

    The entries come from the channel's window (backfill.py), which clients resuming
    near each other share: Redis is read once for all of them.

    A position older than the stream's first entry (trimmed) gets the ``expired``
    gap, one that is no entry of the stream ``unknown_id``; both then get what the
    stream still has after it. A position that is no entry id at all, or newer than
    anything read here, is left to ``Hub.subscribe`` (``unknown_id``, then live).
    """
    if cached(channel, position) or parse_stream_id(position) is None:
        return position
    if stream_order(position) > stream_order(channel.stream_pos):
        return position  # from the future here: another stream's, or a foreign id
    backfill = hub.backfill
    encode = encoder(hub, channel)
    events, ids, reached = await backfill.page(streams, channel, position, page_bytes, encode)
    known = backfill.holds(channel, position)
    if not known:
        reason = None
        first = await streams.first_id(channel.redis) if known is None else b""
        if first is None:
            return position  # the stream is empty: nothing to catch up with
        if first and stream_order(position) < stream_order(first.decode()):
            reason = "expired"
        elif known is False or not await streams.read_range(
            channel.redis, just_before(position).encode(), position.encode(), 1
        ):
            reason = "unknown_id"
        if reason is not None:
            hub.stats.gaps[channel.label] += 1
            await write([gap_event(channel.name, reason, last_event_id)], [None])
    hub.stats.redis_replays[channel.label] += 1
    while True:
        if events:
            await write(events, list(ids))
        position = reached
        if cached(channel, position):
            return position
        events, ids, reached = await backfill.page(streams, channel, position, page_bytes, encode)


async def resume_streams(
    hub: Source,
    channels: Sequence[Channel],
    last_event_id: str | None,
    mux: bool,
    send: Callable[[bytes], Awaitable[None]],
) -> str | None:
    """Before a stream registers: catch its stream channels up from Redis where their
    positions are older than the hub's memory. Returns the Last-Event-ID to resume
    from memory with (the same, or one advanced past what was sent here).

    Raises ``RedisError`` when Redis cannot be read: the caller ends the stream
    cleanly, and the browser comes back later with the id of the last event it got.
    """
    streams = hub.streams
    if last_event_id is None or streams is None or not any(c.stream for c in channels):
        return last_event_id
    # Pages of about 64 KiB: what a resuming client holds while the hub waits for it to
    # read is its transport's buffer (bounded) plus at most one such page.
    page = min(hub.replay_bound, PAGE_BYTES)
    if not mux:
        (channel,) = channels

        async def write(events: list[bytes], ids: list[str | None]) -> None:
            await send(b"".join(events))

        return await catch_up_from_redis(
            hub, streams, channel, last_event_id, write, last_event_id, page
        )
    ordered = streams_of(channels)
    hub_part, positions = split_mux_id(last_event_id, len(ordered))
    if positions is None:
        return last_event_id  # no stream positions in it: memory (or a gap) it is
    for i, channel in enumerate(ordered):

        async def write_mux(
            events: list[bytes], ids: list[str | None], i: int = i, channel: Channel = channel
        ) -> None:
            parts = []
            for raw, position in zip(events, ids, strict=True):
                if not raw:
                    continue  # an entry its format rejects: no event
                if position is None:
                    parts.append(raw)  # the gap event, as /events carry it
                    continue
                # Every other stream stays where the client is: the id says so exactly.
                positions[i] = position
                event_id = hub_part + "".join("~" + compact(p) for p in positions)
                parts.append(hub.mux_event(channel, raw, event_id.encode()))
            await send(b"".join(parts))

        positions[i] = await catch_up_from_redis(
            hub, streams, channel, positions[i], write_mux, last_event_id, page
        )
    return hub_part + "".join("~" + compact(p) for p in positions)
