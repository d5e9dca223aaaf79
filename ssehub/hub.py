"""Channels, their subscribers, and the hot path: one message in, the same bytes out to all.

Rules this module keeps (see DESIGN.md): no task, queue or await per subscriber per
message; each message is encoded once; the write buffer of every transport is
checked before writing and a subscriber over ``limits.max_buffer_bytes`` is cut.
Messages that arrive within one event-loop iteration are coalesced into one write
per subscriber.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable

from . import sse
from .config import ChannelConfig, Config
from .messages import Event, Rejected, parse_text
from .subscriber import Subscriber

__all__ = ["Channel", "Hub", "Stats"]

log = logging.getLogger(__name__)

_HEARTBEAT = sse.comment()
_HEARTBEAT_CHUNK = sse.chunk(_HEARTBEAT)


class Stats:
    """Plain counters, read by the metrics collector at scrape time (never on the hot path)."""

    __slots__ = (
        "closed",
        "delivered",
        "gaps",
        "opened",
        "received",
        "rejected",
        "replays",
        "slow_cut",
    )

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()  # per channel
        self.rejected: Counter[tuple[str, str]] = Counter()  # (channel, reason)
        self.delivered = 0  # event writes to subscribers
        self.opened: Counter[str] = Counter()  # per channel
        self.closed: Counter[str] = Counter()  # per reason
        self.slow_cut = 0
        self.replays: Counter[str] = Counter()  # per channel: resumes served from history
        self.gaps: Counter[str] = Counter()  # per channel: clients told they missed events


class Channel:
    """One configured channel: its subscribers and the bytes waiting to go out."""

    __slots__ = ("chunked", "config", "last_write", "name", "pending", "pending_since", "plain")

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config
        self.name = config.name
        # transport -> subscriber; iterated on every message, so keyed by the
        # object the loop needs (saves an attribute lookup per write).
        self.chunked: dict[asyncio.Transport, Subscriber] = {}
        self.plain: dict[asyncio.Transport, Subscriber] = {}
        self.pending: list[bytes] = []
        self.pending_since = 0.0
        self.last_write = 0.0

    def __len__(self) -> int:
        return len(self.chunked) + len(self.plain)

    def subscribers(self) -> Iterable[Subscriber]:
        """Every subscriber, whatever its framing."""
        yield from self.chunked.values()
        yield from self.plain.values()


class Hub:
    """All channels of one process; fed by the broker, read by the HTTP app."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.channels: dict[str, Channel] = {}
        # Keyed by the raw Redis channel name, as the broker reads it off the wire.
        self._by_redis: dict[bytes, list[Channel]] = {}
        self._dirty: list[Channel] = []
        self._flush_scheduled = False
        self._heartbeat: asyncio.TimerHandle | None = None
        self._max_buffer = config.limits.max_buffer_bytes
        self._max_message = config.limits.max_message_bytes
        # Called once per channel per flush with the seconds from the first pending
        # message's arrival to its write (the metrics histogram); never per subscriber.
        self.observe_delay: Callable[[float], None] | None = None
        for ch in config.channels.values():
            self._add_channel(ch)

    # --- channels -----------------------------------------------------------------

    def _add_channel(self, ch: ChannelConfig) -> None:
        channel = Channel(ch)
        self.channels[ch.name] = channel
        self._by_redis.setdefault(ch.redis_channel.encode(), []).append(channel)

    def redis_channels(self) -> list[str]:
        """The Redis channels the broker must subscribe to."""
        return sorted(k.decode() for k in self._by_redis)

    @property
    def connections(self) -> int:
        """Open streams across all channels."""
        return sum(len(c) for c in self.channels.values())

    # --- subscribers --------------------------------------------------------------

    def subscribe(self, channel: Channel, sub: Subscriber) -> None:
        """Start delivering ``channel``'s events to ``sub``. Synchronous: no await, no gap."""
        (channel.chunked if sub.chunked else channel.plain)[sub.transport] = sub
        self.stats.opened[channel.name] += 1

    def unsubscribe(self, channel: Channel, sub: Subscriber) -> None:
        """Stop delivering to ``sub`` and count why it ended."""
        group = channel.chunked if sub.chunked else channel.plain
        if group.pop(sub.transport, None) is not None:
            self.stats.closed[sub.reason or "client_gone"] += 1

    def close_all(self, reason: str) -> None:
        """End every stream cleanly (shutdown): browsers reconnect, elsewhere or later."""
        for channel in self.channels.values():
            for sub in list(channel.subscribers()):
                sub.end(reason)

    # --- the hot path -------------------------------------------------------------

    def publish(self, redis_channel: bytes, payload: bytes) -> None:
        """Take one message from Redis; validated and encoded once, delivered on flush."""
        channels = self._by_redis.get(redis_channel)
        if not channels:
            return
        for channel in channels:
            self.stats.received[channel.name] += 1
            try:
                event = parse_text(payload, self._max_message)
                data = self.encode(channel, event)
            except Rejected as exc:
                self.stats.rejected[(channel.name, exc.reason)] += 1
                log.warning(
                    "message rejected channel=%s reason=%s detail=%s",
                    channel.name,
                    exc.reason,
                    exc.detail,
                )
                continue
            if not channel:
                continue  # nobody listening: nothing to write
            if not channel.pending:
                channel.pending_since = time.monotonic()
                self._dirty.append(channel)
            channel.pending.append(data)
        if self._dirty and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def encode(self, channel: Channel, event: Event) -> bytes:
        """Event to wire bytes (once per message, whatever the number of subscribers)."""
        try:
            return sse.encode(event.data, event=event.event, id=event.id, retry=event.retry)
        except sse.EncodeError as exc:
            raise Rejected("bad_field", str(exc)) from None

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        now = time.monotonic()
        observe = self.observe_delay
        for channel in dirty:
            pending = channel.pending
            channel.pending = []
            raw = pending[0] if len(pending) == 1 else b"".join(pending)
            channel.last_write = now
            self._write(channel, raw, sse.chunk(raw))
            self.stats.delivered += len(pending) * len(channel)
            if observe is not None:
                observe(time.monotonic() - channel.pending_since)

    def _write(self, channel: Channel, raw: bytes, framed: bytes) -> None:
        limit = self._max_buffer
        slow: list[Subscriber] | None = None
        for transport, sub in channel.chunked.items():
            if transport.get_write_buffer_size() > limit:
                slow = slow or []
                slow.append(sub)
            else:
                transport.write(framed)
        if channel.plain:
            for transport, sub in channel.plain.items():
                if transport.get_write_buffer_size() > limit:
                    slow = slow or []
                    slow.append(sub)
                else:
                    transport.write(raw)
        if slow:
            self._cut_slow(channel, slow)

    def _cut_slow(self, channel: Channel, slow: list[Subscriber]) -> None:
        for sub in slow:
            self.stats.slow_cut += 1
            log.warning(
                "slow subscriber cut channel=%s buffered=%d limit=%d",
                channel.name,
                sub.transport.get_write_buffer_size(),
                self._max_buffer,
            )
            sub.abort("slow")
            self.unsubscribe(channel, sub)

    # --- heartbeat ----------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """One timer for the whole hub, not one per connection."""
        loop = asyncio.get_running_loop()
        self._heartbeat = loop.call_later(self.config.heartbeat, self._beat)

    def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    def _beat(self) -> None:
        interval = self.config.heartbeat
        now = time.monotonic()
        for channel in self.channels.values():
            # A channel that carried an event within the interval needs no keepalive.
            if channel and now - channel.last_write >= interval * 0.5:
                channel.last_write = now
                self._write(channel, _HEARTBEAT, _HEARTBEAT_CHUNK)
        self._heartbeat = asyncio.get_running_loop().call_later(interval, self._beat)
