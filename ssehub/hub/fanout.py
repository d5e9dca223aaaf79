"""The hot path: one numbered entry in, the same bytes out to every stream that follows it.

Rules this module keeps (see DESIGN.md): no task, queue or await per subscriber per
message; each message is encoded once per stream kind; the write buffer of every
transport is checked before writing and a subscriber over ``limits.max_buffer_bytes``
is cut. Entries that arrive within one event-loop iteration are coalesced into one
write per subscriber.

``/events`` streams following the same set of channels share a ``MuxGroup``, whose
bytes a flush builds once: typed by channel, with the hub's ids (and each stream
channel's entry id: see core/ids.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from ..config import Config
from ..core import sse
from ..core.history import AT, ID, RAW, SEQ, Entry
from ..core.ids import Numbering, mux_id
from ..logs import fields
from .channel import Channel, Group, MuxGroup, Subscriber, Tap, pools_of, streams_of
from .resume import gap_event
from .sessions import Sessions
from .stats import Stats

__all__ = ["HEARTBEAT", "Fanout"]

log = logging.getLogger(__name__)

HEARTBEAT = sse.comment()
_HEARTBEAT_CHUNK = sse.chunk(HEARTBEAT)


def _send(
    subs: dict[asyncio.Transport, Subscriber], data: bytes, limit: int, slow: list[Subscriber]
) -> None:
    """Write ``data`` to every transport under ``limit`` buffered bytes; collect the rest."""
    # A client that just went away has a closed transport until its handler
    # unsubscribes, an iteration later; uvloop raises on writing to it. The try
    # costs nothing when nothing raises (3.11), unlike an is_closing() call each.
    for transport, sub in subs.items():
        try:
            if transport.get_write_buffer_size() > limit:
                slow.append(sub)
            else:
                transport.write(data)
        except RuntimeError:
            continue


class Fanout:
    """Pending entries, the /events groups, and the writes to every stream."""

    def __init__(
        self,
        config: Config,
        stats: Stats,
        numbering: Numbering,
        channels: dict[str, Channel],
        sessions: Sessions,
    ) -> None:
        self.stats = stats
        self.numbering = numbering
        self.channels = channels  # the registry's, by name (never replaced)
        self.sessions = sessions
        self.mux: dict[frozenset[str], MuxGroup] = {}
        self._pooled: Counter[str] = Counter()  # /events groups per pool (see pools_of)
        self._pending: list[tuple[Channel, Entry]] = []
        self._flush_scheduled = False
        # Called once per flush with the seconds from the oldest pending message's
        # arrival to the flush's writes (the metrics histogram); never per subscriber.
        self.observe_delay: Callable[[float], None] | None = None
        # With workers, the main process's hub numbers messages and tells the feed.
        self.tap: Tap | None = None
        # Stops delivering to a stream cut for being slow (the hub's unsubscribe).
        self.on_cut: Callable[[Subscriber], None] = lambda sub: None
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Take the settings read on the hot path from ``config``."""
        self.config = config
        self._max_buffer = config.limits.max_buffer_bytes

    # --- in -----------------------------------------------------------------------

    def deliver(
        self, channel: Channel, new: Entry, publisher_id: bool, exclude: tuple[str, ...] = ()
    ) -> None:
        """Keep a numbered entry in ``channel``'s history; write it to subscribers on flush.

        The one way in for numbered entries: the local ingest, and in a worker the
        node's feed (which numbered them in the main process). ``exclude``: session
        ids that must not get it (the history keeps it like any other event).
        """
        channel.history.append(new, publisher_id=publisher_id)
        channel.last_seq = new[SEQ]
        if channel.stream:  # (a worker's stream channels move on with their feed)
            channel.stream_pos = new[ID]
        if self.tap is not None:
            self.tap.entry(channel, new, publisher_id, exclude)
        if exclude:
            excluded = self.sessions.exclude(exclude, new[SEQ])
            if excluded:
                self._deliver_except(channel, new, excluded)
                return
        subs = channel.subs
        if subs.chunked or subs.plain or channel.mux_groups:
            self._pending.append((channel, new))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)
        elif channel.stream:
            channel.flushed_pos = new[ID]  # nobody to flush to: delivered as far as can be

    def _deliver_except(self, channel: Channel, e: Entry, excluded: list[Subscriber]) -> None:
        """Write ``e`` at once to every stream of ``channel`` but the ``excluded`` ones.

        Off the common path: what was pending goes out first (order is kept), then the
        excluded streams step out of their groups for one flush of this event alone.
        (A stream not live yet skips it in its replay instead: see Sessions.exclude.)
        """
        self.flush()
        out = []
        for sub in excluded:
            if sub.group is not None and sub.group.remove(sub):
                out.append(sub)
                if isinstance(sub.group, MuxGroup):
                    sub.group.joining += 1  # kept alive should a slow member be cut
        self._pending.append((channel, e))
        try:
            self.flush()
        finally:
            for sub in out:
                group = sub.group
                assert group is not None
                group.add(sub)
                if isinstance(group, MuxGroup):
                    group.joining -= 1

    # --- out: the hot path ----------------------------------------------------------

    def flush(self) -> None:
        """Write every pending entry to its streams now."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        now = time.monotonic()
        by_channel: dict[Channel, list[Entry]] = {}
        for channel, e in pending:
            by_channel.setdefault(channel, []).append(e)
        # /events groups by the channels of this flush they follow, in one order.
        touched: dict[MuxGroup, list[Channel]] = {}
        for channel, entries in by_channel.items():
            channel.last_write = now
            subs = channel.subs
            if subs.chunked or subs.plain:
                raw = entries[0][RAW] if len(entries) == 1 else b"".join(e[RAW] for e in entries)
                self.write(subs, raw, sse.chunk(raw))
                # Plain len()s: a Python-level __len__ here showed in profiles.
                self.stats.delivered += len(entries) * (len(subs.chunked) + len(subs.plain))
            for group in channel.mux_groups:
                followed = touched.get(group)
                if followed is None:
                    touched[group] = [channel]
                else:
                    followed.append(channel)
        if touched:
            self._flush_mux(by_channel, touched)
        for channel, entries in by_channel.items():
            if channel.stream:
                channel.flushed_pos = entries[-1][ID]
        if self.observe_delay is not None:
            first = pending[0][1][AT]
            self.observe_delay(time.monotonic() - first)

    def _flush_mux(
        self, by_channel: dict[Channel, list[Entry]], touched: dict[MuxGroup, list[Channel]]
    ) -> None:
        """Write each /events group its channels' events, in hub order.

        Every event is encoded once; groups that follow the same channels of this
        flush share one bytes object, built once, whatever their number (with one
        message per flush, every group shares it); a flush costs one step per
        (group, channel) pair plus the writes, never one per (group, message).
        """
        encoded: dict[int, bytes] = {}  # seq -> the event as /events carry it
        seqs: dict[Channel, list[int]] = {}
        built: dict[tuple[Channel, ...], tuple[bytes, bytes, int]] = {}
        with_streams: dict[tuple[tuple[Channel, ...], ...], tuple[bytes, bytes, int]] = {}
        for group, channels in touched.items():
            if group.streams:
                # Ids carry every stream channel's position: bytes per channel set.
                skey = (group.streams, tuple(channels))
                out = with_streams.get(skey)
                if out is None:
                    out = with_streams[skey] = self._mux_with_streams(group, channels, by_channel)
                raw, framed, count = out
                self.write(group, raw, framed)
                self.stats.delivered += count * (len(group.chunked) + len(group.plain))
                continue
            key = tuple(channels)
            out = built.get(key)
            if out is None:
                for channel in channels:
                    if channel not in seqs:
                        own = seqs[channel] = []
                        for e in by_channel[channel]:
                            encoded[e[SEQ]] = self.mux_bytes(channel, e)
                            own.append(e[SEQ])
                if len(channels) == 1:
                    order = seqs[channels[0]]
                else:  # merged by seq: /events ids only increase
                    order = sorted([seq for c in channels for seq in seqs[c]])
                raw = b"".join([encoded[seq] for seq in order])
                out = built[key] = (raw, sse.chunk(raw), len(order))
            raw, framed, count = out
            self.write(group, raw, framed)
            self.stats.delivered += count * (len(group.chunked) + len(group.plain))

    def _mux_with_streams(
        self, group: MuxGroup, channels: list[Channel], by_channel: dict[Channel, list[Entry]]
    ) -> tuple[bytes, bytes, int]:
        """A flush's bytes for a group following stream channels: each id carries the
        position of every one of them as it stands after that event."""
        positions = {c: c.flushed_pos for c in group.streams}
        events = sorted(
            ((e, c) for c in channels for e in by_channel[c]), key=lambda ec: ec[0][SEQ]
        )
        epoch = self.numbering.epoch
        parts = []
        for e, c in events:
            if c.stream:
                positions[c] = e[ID]
            event_id = mux_id(epoch, e[SEQ], [positions[s] for s in group.streams])
            parts.append(self.mux_bytes(c, e, event_id.encode()))
        raw = b"".join(parts)
        return raw, sse.chunk(raw), len(parts)

    def mux_bytes(self, channel: Channel, e: Entry, event_id: bytes | None = None) -> bytes:
        """The event as /events streams carry it: typed by channel, with the hub id.

        Derived from the channel's bytes rather than kept: they start with the id
        line, then the event line if any (``sse.encode``'s field order), then the
        rest, which carries over unchanged.
        """
        rest = e[RAW].split(b"\n", 1)[1]
        kind = channel.name.encode()
        if rest.startswith(b"event: "):
            line, rest = rest.split(b"\n", 1)
            kind += b":" + line[7:]
        if event_id is None:
            event_id = b"%s-%d" % (self.numbering.epoch.encode(), e[SEQ])
        return b"id: %s\nevent: %s\n%s" % (event_id, kind, rest)

    def write(self, group: Group, raw: bytes, framed: bytes) -> None:
        """Write to every stream of ``group`` (``framed``: the chunked ones'), cut the slow."""
        limit = self._max_buffer
        slow: list[Subscriber] = []
        _send(group.chunked, framed, limit, slow)
        if group.plain:
            _send(group.plain, raw, limit, slow)
        for sub in slow:
            self.cut(sub, limit)

    def cut(self, sub: Subscriber, limit: int) -> None:
        """Drop a subscriber that does not read, and count it."""
        self.stats.slow_cut += 1
        log.warning(
            "slow subscriber cut",
            extra=fields(
                channels=",".join(c.name for c in sub.channels),
                buffered=sub.transport.get_write_buffer_size(),
                limit=limit,
            ),
        )
        sub.abort("slow")
        self.on_cut(sub)

    def position(self, channels: Sequence[Channel], mux: bool) -> str:
        """A stream's position now (after a flush): a stream channel's is its stream's
        newest entry id; an /events one carries each stream channel's too."""
        numbering = self.numbering
        if not mux:
            return channels[0].stream_pos if channels[0].stream else numbering.position()
        return mux_id(numbering.epoch, numbering.seq, [c.flushed_pos for c in streams_of(channels)])

    # --- groups ---------------------------------------------------------------------

    def refuses_group(self, channels: Sequence[Channel]) -> bool:
        """Whether ``channels`` would be a new /events group past ``max_event_groups``
        in one of the pools it counts in (see ``pools_of``)."""
        limit = self.config.limits.max_event_groups
        if not limit or frozenset(c.name for c in channels) in self.mux:
            return False
        return any(self._pooled[pool] >= limit for pool in pools_of(channels))

    def group(self, channels: Sequence[Channel], mux: bool) -> Group:
        """The group a new stream of ``channels`` joins (created for a new /events set)."""
        if not mux:
            return channels[0].subs
        key = frozenset(c.name for c in channels)
        group = self.mux.get(key)
        if group is None:
            group = self.mux[key] = MuxGroup(channels)
            for channel in channels:
                channel.mux_groups.add(group)
            for pool in group.pools:
                self._pooled[pool] += 1
        return group

    def release_group(self, group: Group) -> None:
        """Forget an /events group nobody is in or joining any more."""
        if isinstance(group, MuxGroup) and not group and not group.joining:
            del self.mux[group.names]
            for channel in group.channels:
                channel.mux_groups.discard(group)
            for pool in group.pools:
                self._pooled[pool] -= 1
                if not self._pooled[pool]:
                    del self._pooled[pool]

    def groups(self) -> Iterable[Group]:
        """Every group of subscribers."""
        for channel in self.channels.values():
            yield channel.subs
        yield from self.mux.values()

    def end(self, channel: Channel, reason: str) -> None:
        """End every live stream of ``channel`` cleanly."""
        for group in [channel.subs, *channel.mux_groups]:
            for sub in group.subscribers():
                sub.end(reason)

    # --- signals to every stream ------------------------------------------------------

    def outage(self) -> None:
        """Tell every stream of a pub/sub channel that events may have been lost."""
        marker = b"id: %s\n\n" % self.numbering.position().encode()
        for channel in self.channels.values():
            if channel.subs and not channel.stream:
                raw = gap_event(channel.name, "redis_outage", None) + marker
                self.stats.gaps[channel.label] += len(channel.subs)
                self.write(channel.subs, raw, sse.chunk(raw))
        for group in list(self.mux.values()):
            pubsub = [c for c in group.channels if not c.stream]
            if not pubsub:
                continue
            mark = b"id: %s\n\n" % self.position(group.channels, True).encode()
            raw = b"".join(gap_event(c.name, "redis_outage", None) for c in pubsub) + mark
            for channel in pubsub:
                self.stats.gaps[channel.label] += len(group)
            self.write(group, raw, sse.chunk(raw))

    def beat(self, interval: float) -> None:
        """The shared keepalive, to every stream that carried nothing for a while."""
        now = time.monotonic()
        for channel in self.channels.values():
            # A channel that carried an event within the interval needs no keepalive.
            if channel.subs and now - channel.last_write >= interval * 0.5:
                channel.last_write = now
                self.write(channel.subs, HEARTBEAT, _HEARTBEAT_CHUNK)
        for group in list(self.mux.values()):
            self.write(group, HEARTBEAT, _HEARTBEAT_CHUNK)
