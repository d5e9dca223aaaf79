"""Channels, their subscribers and history, and the hot path: one message in, the same bytes out.

Rules this module keeps (see DESIGN.md): no task, queue or await per subscriber per
message; each message is encoded once per stream kind; the write buffer of every
transport is checked before writing and a subscriber over ``limits.max_buffer_bytes``
is cut. Messages that arrive within one event-loop iteration are coalesced into one
write per subscriber.

Ids: every event carries one. The hub numbers events with one sequence for the whole
process and prefixes a per-run epoch (``<epoch>-<seq>``), so ids from an earlier run
are recognised as unknown instead of matching another message. A publisher-given id
(``json`` format) is sent as is on ``/channels`` streams and resolved through the
history. ``/events`` streams always carry hub ids: one number is a position in every
channel at once, so one ``Last-Event-ID`` resumes them all (with each stream channel's
entry id after it: see resume.py). Stream channels' events carry their entry ids.

Two parts of the hub live beside it: members.py (family members, created when their
first stream arrives and dropped with their history once the last one has been gone
for the family's ``grace``) and replay.py (the resume seam: a new stream's position,
what it missed written as it reads, then live).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from ..config import Config
from ..core import sse
from ..core.families import Families
from ..core.history import AT, ID, RAW, SEQ, Budget, Entry, History, entry
from ..core.ids import mux_id, new_epoch
from ..core.messages import Event, Rejected, parse, parse_entry, parse_juggernaut
from ..logs import fields
from .channel import Channel, Group, MuxGroup, streams_of
from .members import MEMBER_SWEEP, Members, Refused, Unknown
from .replay import Replay, Resumes
from .resume import GAP_EVENT, gap_event
from .subscriber import Subscriber

if TYPE_CHECKING:
    from ..redis.pubsub import Broker
    from ..redis.streams import Entry as StreamEntry
    from ..redis.streams import StreamSource
    from .sessions import Roster


class Tap(Protocol):
    """Told of every change to the node's numbered state, in order (the workers' feed)."""

    def entry(
        self, channel: Channel, e: Entry, publisher_id: bool, exclude: tuple[str, ...]
    ) -> None: ...
    def member(self, channel: Channel) -> None: ...
    def removed(self, channel: Channel) -> None: ...
    def outage(self, seq: int) -> None: ...


__all__ = ["GAP_EVENT", "Hub", "Refused", "Replay", "Stats", "Tap", "Unknown"]

log = logging.getLogger(__name__)


_HEARTBEAT = sse.comment()
_HEARTBEAT_CHUNK = sse.chunk(_HEARTBEAT)

# Recent entries read when a stream starts (so resumes need no round trip), at most:
# a channel's whole `history` up to this (its bytes stay within `history_bytes`).
_MAX_PREFILL = 10_000


class Stats:
    """Plain counters, read by the metrics collector at scrape time (never on the hot path)."""

    __slots__ = (
        "closed",
        "delivered",
        "evicted",
        "gaps",
        "members_dropped",
        "members_refused",
        "opened",
        "received",
        "redis_replays",
        "rejected",
        "replays",
        "slow_cut",
    )

    def __init__(self) -> None:
        # "per channel" counters are keyed by Channel.label: a family counts as one.
        self.received: Counter[str] = Counter()  # per channel
        self.rejected: Counter[tuple[str, str]] = Counter()  # (channel, reason)
        self.delivered = 0  # event writes to subscribers
        self.opened: Counter[str] = Counter()  # per channel
        self.closed: Counter[str] = Counter()  # per reason
        self.slow_cut = 0
        self.replays: Counter[str] = Counter()  # per channel: resumes served from history
        # per stream channel: resumes older than the cache, read from Redis
        self.redis_replays: Counter[str] = Counter()
        self.gaps: Counter[str] = Counter()  # per channel: clients told they missed events
        self.members_refused: Counter[str] = Counter()  # per family: over limits.max_members
        self.members_dropped: Counter[str] = Counter()  # per family: grace period over
        self.evicted: Counter[tuple[str, str]] = Counter()  # (channel, reason): history drops


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


class Hub(Resumes, Members):
    """All channels of one process; fed by the broker, read by the HTTP app."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        # Listed channels and live family members, by name.
        self.channels: dict[str, Channel] = {}
        self.families = Families(())
        self.members: Counter[str] = Counter()  # live members per family
        # Members no stream holds, by grace, each oldest first: name -> deadline.
        self._idle: dict[float, dict[Channel, float]] = {}
        self._member_sweep: asyncio.TimerHandle | None = None
        # The Redis side, told what to follow (set by the server): pub/sub channels
        # through the broker, stream channels through the stream reader.
        self.broker: Broker | None = None
        self.streams: StreamSource | None = None
        # Keyed by the raw Redis channel name, as the broker reads it off the wire,
        # and by stream key.
        self._by_redis: dict[bytes, list[Channel]] = {}
        self._by_stream: dict[bytes, list[Channel]] = {}
        self._mux: dict[frozenset[str], MuxGroup] = {}
        self._pending: list[tuple[Channel, Entry]] = []
        self._catching_up: dict[Subscriber, Replay] = {}
        self._connections = 0
        self._flush_scheduled = False
        self._heartbeat: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._aging: set[History] = set()  # histories with an age bound, for the expiry timer
        self.budget = Budget(config.limits.history_bytes, self.stats.evicted)
        # Per-run epoch: start time in ms, base 36 (8 characters for centuries).
        self.epoch = new_epoch()
        self.seq = 0  # last hub sequence number handed out
        self.outage_seq = 0  # positions up to this one predate the last Redis outage
        # Called once per channel per flush with the seconds from the first pending
        # message's arrival to its write (the metrics histogram); never per subscriber.
        self.observe_delay: Callable[[float], None] | None = None
        # With workers, the main process's hub numbers messages and tells the feed.
        self.tap: Tap | None = None
        # Streams by session id (for ``except``), and who reports their comings and
        # goings (events, presence: sessions.py); None when neither is configured.
        self.sessions: dict[str, Subscriber] = {}
        self.roster: Roster | None = None
        for ch in config.channels.values():
            if not ch.family:
                self.channels[ch.name] = Channel(ch, self.budget)
        self._apply(config)

    def _apply(self, config: Config) -> None:
        """Take the settings read on the hot path from ``config``, and index the channels."""
        self.config = config
        self._max_buffer = config.limits.max_buffer_bytes
        # A replay fills at most half the bound (plus one event), so the stream goes
        # live with room for the live events behind it before it would count as slow.
        self._replay_bound = max(config.limits.max_buffer_bytes // 2, 1)
        self._max_message = config.limits.max_message_bytes
        self._juggernaut = (
            config.juggernaut.redis_channel.encode() if config.juggernaut.enabled else None
        )
        self.families = Families(config.channels.values())
        self._by_redis = {}
        self._by_stream = {}
        for channel in self.channels.values():
            self._index(channel).setdefault(channel.redis, []).append(channel)
        self._aging = {c.history for c in self.channels.values() if c.history.ttl > 0}
        self.budget.limit = config.limits.history_bytes
        self.budget._settle()
        if self._expiry is not None:  # the interval may have changed: re-arm at once
            self._expiry.cancel()
            self._expire()

    def _index(self, channel: Channel) -> dict[bytes, list[Channel]]:
        return self._by_stream if channel.stream else self._by_redis

    def _upstream(self, channel: Channel) -> Broker | StreamSource | None:
        return self.streams if channel.stream else self.broker

    def reload(self, config: Config) -> tuple[list[str], list[str], list[str]]:
        """Apply a new config: returns the channels and families (added, removed, changed).

        Streams of removed channels, and of members no family serves any more, end
        cleanly; every other stream stays connected.
        """
        self._flush()
        old = self.config.channels
        added = [n for n in config.channels if n not in old]
        removed = [n for n in old if n not in config.channels]
        changed = [n for n in config.channels if n in old and old[n] != config.channels[n]]
        for name in removed:
            if not old[name].family:
                channel = self.channels.pop(name)
                channel.history.clear()
                self._end(channel, "channel_removed")
        families = Families(config.channels.values())
        for member in [c for c in self.channels.values() if c.family is not None]:
            found = None if member.name in config.channels else families.find(member.name)
            if (
                found is None
                or found[0].name != member.label
                or bool(found[0].config.stream) != member.stream
            ):
                self._remove_member(member)
                continue
            family, part = found
            grace = family.config.grace
            idle = self._idle.get(member.config.grace, {})
            if member in idle and grace != member.config.grace:
                del idle[member]  # re-queued under its new grace, still in deadline order
                self._idle.setdefault(grace, {})[member] = time.monotonic() + grace
            member.family = family
            member.config = family.config
            member.redis = family.redis_channel(part)
            cfg = family.config
            member.history.resize(cfg.history, cfg.history_ttl, cfg.history_bytes)
        for name in changed:
            listed = self.channels.get(name)
            if listed is None or listed.family is not None:
                continue
            new = config.channels[name]
            if new.stream != listed.config.stream:
                # Another source means other ids: its streams start over.
                listed.history.clear()
                self._end(self.channels.pop(name), "channel_removed")
                added.append(name)
                continue
            listed.config = new
            listed.redis = (new.stream or new.redis_channel).encode()
            listed.history.resize(new.history, new.history_ttl, new.history_bytes)
        for name in added:
            if not config.channels[name].family:
                self.channels[name] = Channel(config.channels[name], self.budget)
        self._apply(config)
        if self.broker is not None:
            self.broker.set_channels(self.redis_channels())
        if self.streams is not None:
            self.streams.set_streams(self._by_stream)
        return added, removed, changed

    def _end(self, channel: Channel, reason: str) -> None:
        """End every stream of ``channel`` cleanly, the live ones and those catching up."""
        for group in [channel.subs, *channel.mux_groups]:
            for sub in group.subscribers():
                sub.end(reason)
        for sub in list(self._catching_up):
            if channel in sub.channels:
                sub.end(reason)

    def redis_channels(self) -> list[bytes]:
        """The Redis channels the broker must subscribe to."""
        names = set(self._by_redis)
        if self._juggernaut is not None:
            names.add(self._juggernaut)
        return sorted(names)

    def sharded(self, redis_channel: bytes) -> bool:
        """With Redis Cluster: True when ``redis_channel`` is published with SPUBLISH."""
        channels = self._by_redis.get(redis_channel)
        # Juggernaut publishers use classic PUBLISH, as they always did.
        return channels is not None and all(c.config.sharded for c in channels)

    @property
    def catching_up(self) -> int:
        """Streams still replaying what they missed (not yet live)."""
        return len(self._catching_up)

    @property
    def upstream_ready(self) -> bool:
        """Subscribed to every pub/sub channel, and reading every stream channel."""
        if self.broker is not None and not self.broker.ready:
            return False
        return not self._by_stream or self.streams is None or self.streams.ready

    @property
    def connections(self) -> int:
        """Open streams across all channels."""
        return self._connections

    def position(self) -> str:
        """The id of the current position: everything up to now has been delivered."""
        return f"{self.epoch}-{self.seq}"

    def _position(self, channels: Sequence[Channel], mux: bool) -> str:
        """A stream's position now (after a flush): a stream channel's is its stream's
        newest entry id; an /events one carries each stream channel's too."""
        if not mux:
            return channels[0].stream_pos if channels[0].stream else self.position()
        return mux_id(self.epoch, self.seq, [c.flushed_pos for c in streams_of(channels)])

    # --- input --------------------------------------------------------------------

    def publish(self, redis_channel: bytes, payload: bytes) -> None:
        """Take one message from Redis: validate and encode it once, deliver on flush."""
        channels = self._by_redis.get(redis_channel)
        if channels is None:
            if redis_channel == self._juggernaut:
                self._publish_juggernaut(payload)
            return
        for channel in channels:
            self.stats.received[channel.label] += 1
            try:
                event = parse(channel.config.format, payload, self._max_message)
                self._ingest(channel, event)
            except Rejected as exc:
                self._reject(channel.label, exc)

    def stream_keys(self) -> list[bytes]:
        """The stream keys the stream reader must read."""
        return sorted(self._by_stream)

    def stream_prefill(self, key: bytes) -> int:
        """Recent entries of ``key`` to read when it starts: what its channels keep."""
        return min(
            _MAX_PREFILL, max((c.config.history for c in self._by_stream.get(key, ())), default=0)
        )

    def stream_maxlen(self, key: bytes) -> int:
        """The length to trim ``key`` to (``stream_maxlen``; 0: leave it to publishers)."""
        return max((c.config.stream_maxlen for c in self._by_stream.get(key, ())), default=0)

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
                if self.families.find(name) is None:
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
                self.stats.rejected[(channel.label, "internal_error")] += 1
                log.exception("delivery failed", extra=fields(channel=channel.label))
        if unknown:
            # One line per message however many names it lists; each one is counted.
            detail = ", ".join(unknown)
            self._reject("juggernaut", Rejected("unknown_channel", detail), len(unknown))

    def _reject(self, channel: str, exc: Rejected, count: int = 1) -> None:
        self.stats.rejected[(channel, exc.reason)] += count
        log.warning(
            "message rejected", extra=fields(channel=channel, reason=exc.reason, detail=exc.detail)
        )

    def _ingest(self, channel: Channel, event: Event) -> None:
        seq = self.seq + 1
        event_id = event.id if event.id is not None else f"{self.epoch}-{seq}"
        try:
            raw = sse.encode(event.data, event=event.event, id=event_id, retry=event.retry)
        except sse.EncodeError as exc:
            raise Rejected("bad_field", str(exc)) from None
        except UnicodeEncodeError:  # a lone surrogate that got past the parser
            raise Rejected("invalid_utf8", "lone surrogate") from None
        self.seq = seq
        self.deliver(channel, entry(seq, event_id, raw), event.id is not None, event.exclude)

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
            excluded = [s for s in map(self.sessions.get, exclude) if s is not None]
            if excluded:
                self._deliver_except(channel, new, excluded)
                return
        subs = channel.subs
        if subs.chunked or subs.plain or channel.mux_groups:
            self._pending.append((channel, new))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        elif channel.stream:
            channel.flushed_pos = new[ID]  # nobody to flush to: delivered as far as can be

    def _deliver_except(self, channel: Channel, e: Entry, excluded: list[Subscriber]) -> None:
        """Write ``e`` at once to every stream of ``channel`` but the ``excluded`` ones.

        Off the common path: what was pending goes out first (order is kept), then the
        excluded streams step out of their groups for one flush of this event alone. A
        stream still catching up skips it in its replay instead.
        """
        self._flush()
        out = []
        for sub in excluded:
            replay = self._catching_up.get(sub)
            if replay is not None:
                if replay.skip is None:
                    replay.skip = set()
                replay.skip.add(e[SEQ])
            elif sub.group is not None and sub.group.remove(sub):
                out.append(sub)
                if isinstance(sub.group, MuxGroup):
                    sub.group.joining += 1  # kept alive should a slow member be cut
        self._pending.append((channel, e))
        try:
            self._flush()
        finally:
            for sub in out:
                group = sub.group
                assert group is not None
                group.add(sub)
                if isinstance(group, MuxGroup):
                    group.joining -= 1

    @property
    def replay_bound(self) -> int:
        """Bytes a replay may put in a transport's buffer before it waits for the client."""
        return self._replay_bound

    def mux_event(self, channel: Channel, raw: bytes, event_id: bytes) -> bytes:
        """``raw`` (a channel's event, its id line first) as /events carry it."""
        return self._mux_bytes(channel, (0, "", raw, 0.0), event_id)

    def _mux_bytes(self, channel: Channel, e: Entry, event_id: bytes | None = None) -> bytes:
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
            event_id = b"%s-%d" % (self.epoch.encode(), e[SEQ])
        return b"id: %s\nevent: %s\n%s" % (event_id, kind, rest)

    # --- the hot path -------------------------------------------------------------

    def _flush(self) -> None:
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
                self._write(subs, raw, sse.chunk(raw))
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
                self._write(group, raw, framed)
                self.stats.delivered += count * (len(group.chunked) + len(group.plain))
                continue
            key = tuple(channels)
            out = built.get(key)
            if out is None:
                for channel in channels:
                    if channel not in seqs:
                        own = seqs[channel] = []
                        for e in by_channel[channel]:
                            encoded[e[SEQ]] = self._mux_bytes(channel, e)
                            own.append(e[SEQ])
                if len(channels) == 1:
                    order = seqs[channels[0]]
                else:  # merged by seq: /events ids only increase
                    order = sorted([seq for c in channels for seq in seqs[c]])
                raw = b"".join([encoded[seq] for seq in order])
                out = built[key] = (raw, sse.chunk(raw), len(order))
            raw, framed, count = out
            self._write(group, raw, framed)
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
        parts = []
        for e, c in events:
            if c.stream:
                positions[c] = e[ID]
            event_id = mux_id(self.epoch, e[SEQ], [positions[s] for s in group.streams])
            parts.append(self._mux_bytes(c, e, event_id.encode()))
        raw = b"".join(parts)
        return raw, sse.chunk(raw), len(parts)

    def _write(self, group: Group, raw: bytes, framed: bytes) -> None:
        limit = self._max_buffer
        slow: list[Subscriber] = []
        _send(group.chunked, framed, limit, slow)
        if group.plain:
            _send(group.plain, raw, limit, slow)
        for sub in slow:
            self._cut(sub, limit)

    def _cut(self, sub: Subscriber, limit: int) -> None:
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
        self.unsubscribe(sub)

    # --- subscribers --------------------------------------------------------------

    def refuses_group(self, channels: Sequence[Channel]) -> bool:
        """Whether ``channels`` would be a new /events group past ``max_event_groups``."""
        limit = self.config.limits.max_event_groups
        return (
            bool(limit)
            and len(self._mux) >= limit
            and frozenset(c.name for c in channels) not in self._mux
        )

    def _group(self, channels: Sequence[Channel], mux: bool) -> Group:
        if not mux:
            return channels[0].subs
        key = frozenset(c.name for c in channels)
        group = self._mux.get(key)
        if group is None:
            group = self._mux[key] = MuxGroup(channels)
            for channel in channels:
                channel.mux_groups.add(group)
        return group

    def unsubscribe(self, sub: Subscriber) -> None:
        """Stop delivering to ``sub`` and count why it ended."""
        group = sub.group
        if group is None:
            return
        if self._catching_up.pop(sub, None) is not None:
            if isinstance(group, MuxGroup):
                group.joining -= 1
        elif not group.remove(sub):
            return
        self._connections -= 1
        reason = sub.reason or "client_gone"
        self.stats.closed[reason] += 1
        if sub.session:
            self.sessions.pop(sub.session, None)
        if self.roster is not None:
            self.roster.left(sub, reason)
        if isinstance(group, MuxGroup) and not group and not group.joining:
            del self._mux[group.names]
            for channel in group.channels:
                channel.mux_groups.discard(group)

    def _joined(self, sub: Subscriber) -> None:
        """A stream registered (live or catching up): index its session, report it."""
        if sub.session:
            self.sessions[sub.session] = sub
        if self.roster is not None:
            self.roster.joined(sub)

    def signal_outage(self, seq: int | None = None) -> None:
        """After a Redis outage: tell every stream that events may have been lost.

        Resumes from positions before this point get the same signal, since what
        Redis published while the hub was away never reached the history. A worker
        passes the position the node's hub gave the outage.
        """
        self._flush()
        self.seq = self.seq + 1 if seq is None else seq
        self.outage_seq = self.seq
        if self.tap is not None:
            self.tap.outage(self.seq)
        marker = b"id: %s\n\n" % self.position().encode()
        for channel in self.channels.values():
            if channel.subs and not channel.stream:
                raw = gap_event(channel.name, "redis_outage", None) + marker
                self.stats.gaps[channel.label] += len(channel.subs)
                self._write(channel.subs, raw, sse.chunk(raw))
        for group in list(self._mux.values()):
            pubsub = [c for c in group.channels if not c.stream]
            if not pubsub:
                continue
            mark = b"id: %s\n\n" % self._position(group.channels, True).encode()
            raw = b"".join(gap_event(c.name, "redis_outage", None) for c in pubsub) + mark
            for channel in pubsub:
                self.stats.gaps[channel.label] += len(group)
            self._write(group, raw, sse.chunk(raw))

    def groups(self) -> Iterable[Group]:
        """Every group of subscribers."""
        for channel in self.channels.values():
            yield channel.subs
        yield from self._mux.values()

    def close_all(self, reason: str) -> None:
        """End every stream cleanly (shutdown): browsers reconnect, elsewhere or later."""
        for group in list(self.groups()):
            for sub in group.subscribers():
                sub.end(reason)
        for sub in list(self._catching_up):
            sub.end(reason)

    # --- timers -------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Start the hub's timers: one heartbeat, one history expiry and one sweep of
        family members for the whole hub, not one per connection or channel."""
        loop = asyncio.get_running_loop()
        self._heartbeat = loop.call_later(self.config.heartbeat, self._beat)
        self._member_sweep = loop.call_later(MEMBER_SWEEP, self._sweep_members)
        self._expire()

    def stop_heartbeat(self) -> None:
        """Stop the hub's timers."""
        for timer in (self._heartbeat, self._expiry, self._member_sweep):
            if timer is not None:
                timer.cancel()
        self._heartbeat = self._expiry = self._member_sweep = None

    def _expire(self) -> None:
        """Free events past their channel's age even when the channel gets no new ones.

        Costs one look per channel with an age bound plus what it frees. Runs every
        half of the shortest ``history_ttl`` (0.05-30 s), so an event outlives its
        age by at most that much.
        """
        ttls = [h.ttl for h in self._aging]
        interval = min(max(min(ttls) / 2, 0.05), 30.0) if ttls else 30.0
        # Re-armed first, as the heartbeat: nothing below may stop it for good.
        self._expiry = asyncio.get_running_loop().call_later(interval, self._expire)
        for history in list(self._aging):
            history.expire()

    def _beat(self) -> None:
        interval = self.config.heartbeat
        # Re-armed first: whatever happens below, keepalives must not stop for good.
        self._heartbeat = asyncio.get_running_loop().call_later(interval, self._beat)
        now = time.monotonic()
        for channel in self.channels.values():
            # A channel that carried an event within the interval needs no keepalive.
            if channel.subs and now - channel.last_write >= interval * 0.5:
                channel.last_write = now
                self._write(channel.subs, _HEARTBEAT, _HEARTBEAT_CHUNK)
        for group in list(self._mux.values()):
            self._write(group, _HEARTBEAT, _HEARTBEAT_CHUNK)
        # A resumer whose replay did not move for a whole interval does not read.
        for replay in list(self._catching_up.values()):
            if replay.pos == replay.seen:
                self._cut(replay.sub, self._replay_bound)
            replay.seen = replay.pos
