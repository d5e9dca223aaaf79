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
channel at once, so one ``Last-Event-ID`` resumes them all.

Family members (``user.42`` of ``user.*``) are channels created when their first stream
arrives and dropped once the last one has been gone for the family's ``grace``: their
Redis subscription and history live exactly that long. A member's history starts
empty, so a position from before it was created gets the ``expired`` gap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from . import sse
from .channel import Channel, Group, MuxGroup
from .config import Config
from .families import Families, Family
from .history import AT, RAW, SEQ, Entry, entry
from .messages import Event, Rejected, parse, parse_juggernaut
from .subscriber import Subscriber

if TYPE_CHECKING:
    from .broker import Broker

__all__ = ["GAP_EVENT", "Hub", "Refused", "Stats", "Unknown"]

log = logging.getLogger(__name__)

# The named event that tells a client it missed events it cannot get back.
GAP_EVENT = "ssehub-gap"

_HEARTBEAT = sse.comment()
_HEARTBEAT_CHUNK = sse.chunk(_HEARTBEAT)

# Seconds between sweeps for family members whose grace period is over.
_MEMBER_SWEEP = 0.5


class Unknown(LookupError):
    """Channel names that no listed channel and no family serves."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


class Refused(Exception):
    """A stream turned away for a transient reason (a limit): the busy answer, not an error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


class Stats:
    """Plain counters, read by the metrics collector at scrape time (never on the hot path)."""

    __slots__ = (
        "closed",
        "delivered",
        "gaps",
        "members_dropped",
        "members_refused",
        "opened",
        "received",
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
        self.gaps: Counter[str] = Counter()  # per channel: clients told they missed events
        self.members_refused: Counter[str] = Counter()  # per family: over limits.max_members
        self.members_dropped: Counter[str] = Counter()  # per family: grace period over


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


class Hub:
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
        # The Redis side: told which Redis channels to follow (set by the server).
        self.broker: Broker | None = None
        # Keyed by the raw Redis channel name, as the broker reads it off the wire.
        self._by_redis: dict[bytes, list[Channel]] = {}
        self._mux: dict[frozenset[str], MuxGroup] = {}
        self._pending: list[tuple[Channel, Entry]] = []
        self._connections = 0
        self._flush_scheduled = False
        self._heartbeat: asyncio.TimerHandle | None = None
        # Per-run epoch: start time in ms, base 36 (8 characters for centuries).
        self.epoch = _base36(time.time_ns() // 1_000_000)
        self.seq = 0  # last hub sequence number handed out
        self.outage_seq = 0  # positions up to this one predate the last Redis outage
        # Called once per channel per flush with the seconds from the first pending
        # message's arrival to its write (the metrics histogram); never per subscriber.
        self.observe_delay: Callable[[float], None] | None = None
        for ch in config.channels.values():
            if not ch.family:
                self.channels[ch.name] = Channel(ch)
        self._apply(config)

    def _apply(self, config: Config) -> None:
        """Take the settings read on the hot path from ``config``, and index the channels."""
        self.config = config
        self._max_buffer = config.limits.max_buffer_bytes
        self._max_message = config.limits.max_message_bytes
        self._juggernaut = (
            config.juggernaut.redis_channel.encode() if config.juggernaut.enabled else None
        )
        self.families = Families(config.channels.values())
        self._by_redis = {}
        for channel in self.channels.values():
            self._by_redis.setdefault(channel.redis, []).append(channel)

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
                self._end(self.channels.pop(name), "channel_removed")
        families = Families(config.channels.values())
        for member in [c for c in self.channels.values() if c.family is not None]:
            found = None if member.name in config.channels else families.find(member.name)
            if found is None or found[0].name != member.label:
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
            member.history.resize(family.config.history, family.config.history_ttl)
        for name in changed:
            channel = self.channels.get(name)
            if channel is not None and channel.family is None:
                channel.config = config.channels[name]
                channel.redis = channel.config.redis_channel.encode()
                channel.history.resize(channel.config.history, channel.config.history_ttl)
        for name in added:
            if not config.channels[name].family:
                self.channels[name] = Channel(config.channels[name])
        self._apply(config)
        if self.broker is not None:
            self.broker.set_channels(self.redis_channels())
        return added, removed, changed

    def _end(self, channel: Channel, reason: str) -> None:
        for group in [channel.subs, *channel.mux_groups]:
            for sub in group.subscribers():
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

    # --- family members -------------------------------------------------------------

    def acquire(self, names: Sequence[str]) -> tuple[Channel, ...]:
        """Hold the channels a new stream follows, creating family members as needed.

        Raises ``Unknown`` for names nothing serves, ``Refused`` when new members
        would pass ``limits.max_members``. Every successful call needs a ``release``.
        """
        found: list[Channel | None] = []
        unknown: list[str] = []
        new: list[tuple[str, Family, str]] = []
        for name in names:
            channel = self.channels.get(name)
            found.append(channel)
            if channel is not None:
                continue
            match = self.families.find(name)
            if match is None or match[0].redis_channel(match[1]) == self._juggernaut:
                unknown.append(name)
            else:
                new.append((name, *match))
        if unknown:
            raise Unknown(unknown)
        if new and sum(self.members.values()) + len(new) > self.config.limits.max_members:
            for _, family, _ in new:
                self.stats.members_refused[family.name] += 1
            raise Refused("max_members")
        created = {name: self._create_member(name, family, part) for name, family, part in new}
        channels = tuple(
            c if c is not None else created[n] for c, n in zip(found, names, strict=True)
        )
        for channel in channels:
            channel.holds += 1
            if channel.family is not None:
                self._idle.get(channel.config.grace, {}).pop(channel, None)
        return channels

    def release(self, channels: Sequence[Channel]) -> None:
        """A stream that held ``channels`` is gone; members no stream holds start their grace."""
        now = time.monotonic()
        for channel in channels:
            channel.holds -= 1
            if (
                channel.holds
                or channel.family is None
                or self.channels.get(channel.name) is not channel
            ):
                continue
            grace = channel.config.grace
            if grace <= 0:
                self._remove_member(channel)
            else:
                self._idle.setdefault(grace, {})[channel] = now + grace

    def _create_member(self, name: str, family: Family, part: str) -> Channel:
        channel = Channel(family.config, name, family, family.redis_channel(part))
        # Nothing before this point reached the new member: positions handed out so
        # far (which are <= seq) get a gap; the new member's own positions come later.
        self.seq += 1
        channel.history.evicted_seq = self.seq
        self.channels[name] = channel
        self.members[family.name] += 1
        others = self._by_redis.setdefault(channel.redis, [])
        others.append(channel)
        if len(others) == 1 and self.broker is not None:
            self.broker.want((channel.redis,))
        return channel

    def _remove_member(self, channel: Channel, reason: str = "channel_removed") -> None:
        """Forget a member: end its streams (if any), unsubscribe, drop its history."""
        if self.channels.get(channel.name) is not channel:
            return
        self._end(channel, reason)
        del self.channels[channel.name]
        self.members[channel.label] -= 1
        if not self.members[channel.label]:
            del self.members[channel.label]
        self._idle.get(channel.config.grace, {}).pop(channel, None)
        others = self._by_redis.get(channel.redis, [])
        if channel in others:
            others.remove(channel)
        if not others:
            self._by_redis.pop(channel.redis, None)
            if self.broker is not None:
                self.broker.drop((channel.redis,))

    def drop_idle_members(self, now: float | None = None) -> int:
        """Drop members whose grace is over (all idle ones when ``now`` is None)."""
        dropped = 0
        for idle in self._idle.values():
            while idle:
                channel, deadline = next(iter(idle.items()))
                if now is not None and deadline > now:
                    break  # each dict is in deadline order: the rest are later
                del idle[channel]
                self.stats.members_dropped[channel.label] += 1
                self._remove_member(channel)
                dropped += 1
        return dropped

    def _sweep_members(self) -> None:
        loop = asyncio.get_running_loop()
        # Re-armed first, like the heartbeat: an error below must not stop the sweeps.
        self._member_sweep = loop.call_later(_MEMBER_SWEEP, self._sweep_members)
        self.drop_idle_members(time.monotonic())

    @property
    def connections(self) -> int:
        """Open streams across all channels."""
        return self._connections

    def position(self) -> str:
        """The id of the current position: everything up to now has been delivered."""
        return f"{self.epoch}-{self.seq}"

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

    def _publish_juggernaut(self, payload: bytes) -> None:
        try:
            names, event = parse_juggernaut(payload, self._max_message)
        except Rejected as exc:
            self._reject("juggernaut", exc)
            return
        for name in names:
            channel = self.channels.get(name)
            if channel is None:
                if self.families.find(name) is None:
                    self._reject("juggernaut", Rejected("unknown_channel", name))
                # else: a family member nobody follows on this hub; nothing to do
                continue
            self.stats.received[channel.label] += 1
            self._ingest(channel, event)

    def _reject(self, channel: str, exc: Rejected) -> None:
        self.stats.rejected[(channel, exc.reason)] += 1
        log.warning(
            "message rejected channel=%s reason=%s detail=%s", channel, exc.reason, exc.detail
        )

    def _ingest(self, channel: Channel, event: Event) -> None:
        seq = self.seq + 1
        event_id = event.id if event.id is not None else f"{self.epoch}-{seq}"
        try:
            raw = sse.encode(event.data, event=event.event, id=event_id, retry=event.retry)
        except sse.EncodeError as exc:
            raise Rejected("bad_field", str(exc)) from None
        self.seq = seq
        new = entry(seq, event_id, raw)
        channel.history.append(new, publisher_id=event.id is not None)
        channel.last_seq = seq
        subs = channel.subs
        if subs.chunked or subs.plain or channel.mux_groups:
            self._pending.append((channel, new))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _mux_bytes(self, channel: Channel, e: Entry) -> bytes:
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
        return b"id: %s-%d\nevent: %s\n%s" % (self.epoch.encode(), e[SEQ], kind, rest)

    # --- the hot path -------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        now = time.monotonic()
        by_channel: dict[Channel, list[bytes]] = {}
        for channel, e in pending:
            by_channel.setdefault(channel, []).append(e[RAW])
        touched: set[MuxGroup] = set()
        for channel, raws in by_channel.items():
            channel.last_write = now
            subs = channel.subs
            if subs.chunked or subs.plain:
                raw = raws[0] if len(raws) == 1 else b"".join(raws)
                self._write(subs, raw, sse.chunk(raw))
                # Plain len()s: a Python-level __len__ here showed in profiles.
                self.stats.delivered += len(raws) * (len(subs.chunked) + len(subs.plain))
            touched.update(channel.mux_groups)
        mux_cache: dict[int, bytes] = {}
        for group in touched:
            # Keep hub order across channels: /events ids must only increase. Each
            # event is encoded once per flush, whatever the number of groups.
            parts = []
            for c, e in pending:
                if c.name in group.names:
                    data = mux_cache.get(e[SEQ])
                    if data is None:
                        data = mux_cache[e[SEQ]] = self._mux_bytes(c, e)
                    parts.append(data)
            raw = b"".join(parts)
            self._write(group, raw, sse.chunk(raw))
            self.stats.delivered += len(parts) * (len(group.chunked) + len(group.plain))
        if self.observe_delay is not None:
            first = pending[0][1][AT]
            self.observe_delay(time.monotonic() - first)

    def _write(self, group: Group, raw: bytes, framed: bytes) -> None:
        limit = self._max_buffer
        slow: list[Subscriber] = []
        _send(group.chunked, framed, limit, slow)
        if group.plain:
            _send(group.plain, raw, limit, slow)
        for sub in slow:
            self.stats.slow_cut += 1
            log.warning(
                "slow subscriber cut channels=%s buffered=%d limit=%d",
                ",".join(c.name for c in sub.channels),
                sub.transport.get_write_buffer_size(),
                limit,
            )
            sub.abort("slow")
            self.unsubscribe(sub)

    # --- subscribers --------------------------------------------------------------

    def subscribe(self, sub: Subscriber, last_event_id: str | None, mux: bool) -> None:
        """Replay what ``sub`` missed, then deliver live events; no gap, no duplicate.

        Synchronous on purpose: the history snapshot, the registration and the
        write of the replay happen in one step, with no await in between, so every
        event is either in the replay or arrives live behind it.
        """
        self._flush()  # events already taken in reach current subscribers first
        preamble = self._resume(sub.channels, last_event_id, mux)
        sub.transport.write(sse.chunk(preamble) if sub.chunked else preamble)
        group: Group
        if mux:
            key = frozenset(c.name for c in sub.channels)
            mux_group = self._mux.get(key)
            if mux_group is None:
                mux_group = self._mux[key] = MuxGroup(sub.channels)
                for channel in sub.channels:
                    channel.mux_groups.add(mux_group)
            group = mux_group
        else:
            group = sub.channels[0].subs
        group.add(sub)
        sub.group = group
        self._connections += 1
        for channel in sub.channels:
            self.stats.opened[channel.label] += 1

    def unsubscribe(self, sub: Subscriber) -> None:
        """Stop delivering to ``sub`` and count why it ended."""
        group = sub.group
        if group is None or not group.remove(sub):
            return
        self._connections -= 1
        self.stats.closed[sub.reason or "client_gone"] += 1
        if isinstance(group, MuxGroup) and not group:
            del self._mux[group.names]
            for channel in group.channels:
                channel.mux_groups.discard(group)

    def _resolve(self, last_event_id: str, channels: Sequence[Channel], mux: bool) -> int | None:
        """A client's Last-Event-ID as a hub sequence number, or None when unknown."""
        epoch, _, seq = last_event_id.rpartition("-")
        if epoch == self.epoch and seq.isdigit() and seq.isascii():
            n = int(seq)
            if n <= self.seq:
                return n
        if not mux:
            for channel in channels:
                found = channel.history.seq_of(last_event_id)
                if found is not None:
                    return found
        return None

    def _resume(self, channels: Sequence[Channel], last_event_id: str | None, mux: bool) -> bytes:
        marker = b"id: %s\n\n" % self.position().encode()
        if last_event_id is None:
            # Even a fresh stream gets a position, so that its reconnect carries a
            # Last-Event-ID and anything missed meanwhile is replayed or signalled.
            return marker
        n = self._resolve(last_event_id, channels, mux)
        gaps: list[bytes] = []
        replay: list[tuple[int, bytes]] = []
        for channel in channels:
            channel.history.expire()
            reason = None
            if n is None:
                reason = "unknown_id"
            else:
                # Events after n fell out of the history, or (a new member) came
                # before the channel existed here.
                if channel.history.evicted_seq > n:
                    reason = "expired"
                if n < channel.last_seq:
                    entries = list(channel.history.after(n))
                    if entries:
                        self.stats.replays[channel.label] += 1
                    for e in entries:
                        replay.append((e[SEQ], self._mux_bytes(channel, e) if mux else e[RAW]))
                if reason is None and n < self.outage_seq:
                    reason = "redis_outage"
            if reason is not None:
                self.stats.gaps[channel.label] += 1
                gaps.append(self._gap(channel, reason, last_event_id))
        replay.sort(key=lambda r: r[0])
        return b"".join(gaps) + b"".join(r for _, r in replay) + marker

    def _gap(self, channel: Channel, reason: str, last_event_id: str | None) -> bytes:
        data = {"channel": channel.name, "reason": reason, "lastEventId": last_event_id}
        return sse.encode(json.dumps(data, separators=(",", ":")), event=GAP_EVENT)

    def signal_outage(self) -> None:
        """After a Redis outage: tell every stream that events may have been lost.

        Resumes from positions before this point get the same signal, since what
        Redis published while the hub was away never reached the history.
        """
        self._flush()
        self.seq += 1
        self.outage_seq = self.seq
        marker = b"id: %s\n\n" % self.position().encode()
        for channel in self.channels.values():
            if channel.subs:
                raw = self._gap(channel, "redis_outage", None) + marker
                self.stats.gaps[channel.label] += len(channel.subs)
                self._write(channel.subs, raw, sse.chunk(raw))
        for group in list(self._mux.values()):
            raw = b"".join(self._gap(c, "redis_outage", None) for c in group.channels) + marker
            for channel in group.channels:
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

    # --- heartbeat ----------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """One timer for the whole hub, not one per connection (and one for members' grace)."""
        loop = asyncio.get_running_loop()
        self._heartbeat = loop.call_later(self.config.heartbeat, self._beat)
        self._member_sweep = loop.call_later(_MEMBER_SWEEP, self._sweep_members)

    def stop_heartbeat(self) -> None:
        for timer in (self._heartbeat, self._member_sweep):
            if timer is not None:
                timer.cancel()
        self._heartbeat = self._member_sweep = None

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
