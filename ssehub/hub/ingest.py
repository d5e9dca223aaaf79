"""Input: messages from Redis validated, numbered and encoded once, then handed on.

Pub/sub messages (in the channel's format), stream entries (their entry id is the
event's id) and Juggernaut's format all come through here. Each message is parsed and
encoded once, numbered with the process's sequence (``<epoch>-<seq>``, see
core/ids.py) and handed to the fan-out's ``deliver``. Whatever goes wrong with one
message -- a rejection, counted and logged once, or a bug -- costs that message only:
never the next ones, nor the rest of a stream batch the reader has moved past.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import Config
from ..core.history import Entry, entry
from ..core.ids import Numbering
from ..core.messages import Event, Rejected, encode_event, parse, parse_entry, parse_juggernaut
from ..logs import fields
from .channel import Channel
from .registry import Registry
from .stats import Stats

if TYPE_CHECKING:
    from ..redis.streams import Entry as StreamEntry

__all__ = ["Ingest"]

log = logging.getLogger(__name__)


class Ingest:
    """The hub's way in from Redis."""

    def __init__(
        self,
        config: Config,
        stats: Stats,
        numbering: Numbering,
        registry: Registry,
        deliver: Callable[[Channel, Entry, bool, tuple[str, ...]], None],
    ) -> None:
        self.stats = stats
        self.numbering = numbering
        self._registry = registry
        self.channels = registry.channels
        # The registry's indexes by Redis channel and stream key (refilled, never replaced).
        self._by_redis = registry.by_redis
        self._by_stream = registry.by_stream
        self.deliver = deliver
        # Told of every message on the control channel (the node's control plane).
        self.on_control: Callable[[bytes, bytes], None] | None = None
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Take the settings read on the hot path from ``config``."""
        self._max_message = config.limits.max_message_bytes

    def publish(self, redis_channel: bytes, payload: bytes) -> None:
        """Take one message from Redis: validate and encode it once, deliver on flush."""
        channels = self._by_redis.get(redis_channel)
        if channels is None:
            if redis_channel == self._registry.juggernaut:
                self._publish_juggernaut(payload)
            elif redis_channel == self._registry.control and self.on_control is not None:
                self.on_control(redis_channel, payload)
            return
        for channel in channels:
            self.stats.received[channel.label] += 1
            try:
                event = parse(channel.config.format, payload, self._max_message)
                self._ingest(channel, event)
            except Rejected as exc:
                self._reject(channel.label, exc)
            except Exception:  # a bug must cost this message only, never the next ones
                self._failed(channel.label)

    def stream_started(self, key: bytes, entries: list[StreamEntry]) -> None:
        """The reader knows where ``key`` ends: keep its recent ``entries`` for resume."""
        for channel in self._by_stream.get(key, ()):
            channel.stream_pos = channel.flushed_pos = entries[-1][0].decode() if entries else "0-0"
        self._stream_input(key, entries, received=False)

    def stream_entries(self, key: bytes, entries: list[StreamEntry]) -> None:
        """New entries of ``key``: each one an event whose id is its entry id."""
        self._stream_input(key, entries, received=True)

    def _stream_input(self, key: bytes, entries: list[StreamEntry], received: bool) -> None:
        for channel in self._by_stream.get(key, ()):
            fmt = channel.config.format
            for entry_id, entry_fields in entries:
                eid = entry_id.decode()
                channel.stream_pos = eid
                if received:
                    self.stats.received[channel.label] += 1
                try:
                    self._ingest(channel, parse_entry(fmt, eid, entry_fields, self._max_message))
                except Rejected as exc:
                    self._reject(channel.label, exc)
                except Exception:  # the reader moved past it: the rest of the batch goes on
                    self._failed(channel.label)

    def _publish_juggernaut(self, payload: bytes) -> None:
        try:
            names, event = parse_juggernaut(payload, self._max_message)
        except Rejected as exc:
            self._reject("juggernaut", exc)
            return
        unknown: list[str] = []
        for name in names:
            channel = self.channels.get(name)
            if channel is None:
                if self._registry.families.find(name) is None:
                    unknown.append(name)
                # else: a family member nobody follows on this hub; nothing to do
                continue
            self.stats.received[channel.label] += 1
            # Each channel on its own: whatever happens to one, the others get the event.
            try:
                if channel.stream:
                    raise Rejected("stream_channel", "its events are its stream's entries")
                self._ingest(channel, event)
            except Rejected as exc:
                self._reject(channel.label, exc)
            except Exception:
                self._failed(channel.label)
        if unknown:
            # One line per message however many names it lists; each one is counted.
            detail = ", ".join(unknown)
            self._reject("juggernaut", Rejected("unknown_channel", detail), len(unknown))

    def _reject(self, channel: str, exc: Rejected, count: int = 1) -> None:
        self.stats.rejected[(channel, exc.reason)] += count
        log.warning(
            "message rejected", extra=fields(channel=channel, reason=exc.reason, detail=exc.detail)
        )

    def _failed(self, channel: str) -> None:
        self.stats.rejected[(channel, "internal_error")] += 1
        log.exception("delivery failed", extra=fields(channel=channel))

    def _ingest(self, channel: Channel, event: Event) -> None:
        numbering = self.numbering
        seq = numbering.seq + 1
        event_id = event.id if event.id is not None else f"{numbering.epoch}-{seq}"
        raw = encode_event(event, event_id)
        numbering.seq = seq
        self.deliver(channel, entry(seq, event_id, raw), event.id is not None, event.exclude)
