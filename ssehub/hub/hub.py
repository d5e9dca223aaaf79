"""One process's hub: messages in from Redis, numbered and encoded once, out to every stream.

The hub is composed of the parts it holds, each in its own module:

- ``Ingest`` (ingest.py): the way in -- pub/sub messages, stream entries and
  Juggernaut's format validated, numbered and encoded once, handed to the fan-out.
- ``Registry`` (registry.py): every channel by name and by what feeds it, and family
  members' lifetime (created on a stream's arrival, dropped after their ``grace``).
- ``Fanout`` (fanout.py): the hot path -- pending entries, the ``/events`` groups, the
  writes to every stream, the shared heartbeat.
- ``Replays`` (replay.py): the resume seam -- a new stream's position, what it missed
  written as it reads, then live.
- ``Sessions`` (sessions.py): streams by session id (``except``), and the roster that
  reports comings and goings.

This module wires them together, keeps the hub's timers (one heartbeat, one history
expiry, one member sweep for the whole hub) and applies reloads. Ids (core/ids.py):
``<epoch>-<seq>`` from one sequence per process, a publisher's own id as is on
``/channels``, one position in every channel on ``/events`` (with each stream
channel's entry id), entry ids on stream channels.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from ..config import Config
from ..core.families import Families
from ..core.history import Budget
from ..core.ids import Numbering
from .backfill import Backfill
from .channel import Channel, Group, Subscriber, Tap
from .fanout import Fanout
from .ingest import Ingest
from .registry import MEMBER_SWEEP, Refused, Registry, Unknown
from .replay import Replay, Replays
from .resume import GAP_EVENT
from .sessions import Roster, Sessions
from .stats import Stats

if TYPE_CHECKING:
    from ..redis.pubsub import PubSubSource
    from ..redis.streams import StreamSource

__all__ = ["GAP_EVENT", "Hub", "Refused", "Replay", "Stats", "Tap", "Unknown"]


class Hub:
    """All channels of one process; fed by the broker, read by the HTTP app."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.budget = Budget(config.limits.history_bytes, self.stats.evicted)
        # Per-run epoch and the one sequence for the whole process.
        self.numbering = Numbering()
        self.sessions = Sessions()
        self.registry = Registry(config, self.stats, self.budget, self.numbering, self._end)
        # Listed channels and live family members, by name (the registry's own dict).
        self.channels = self.registry.channels
        self.fanout = Fanout(config, self.stats, self.numbering, self.channels, self.sessions)
        self.fanout.on_cut = self.unsubscribe
        self.replays = Replays(config, self.stats, self.numbering, self.fanout, self.sessions)
        # Stream entries older than the histories, read once for the clients resuming them.
        self.backfill = Backfill()
        # The one way in for numbered entries (the workers' feed calls it too).
        self.deliver = self.fanout.deliver
        self.ingest = Ingest(config, self.stats, self.numbering, self.registry, self.deliver)
        # Messages and stream entries from Redis (the broker and stream reader call these).
        self.publish = self.ingest.publish
        self.stream_started = self.ingest.stream_started
        self.stream_entries = self.ingest.stream_entries
        # The registry's indexes by Redis channel and stream key (refilled, never replaced).
        self._by_redis = self.registry.by_redis
        self._by_stream = self.registry.by_stream
        # The Redis side (set by the server): pub/sub channels through the broker,
        # stream channels through the stream reader.
        self._broker: PubSubSource | None = None
        self._streams: StreamSource | None = None
        self._tap: Tap | None = None
        self._connections = 0
        self._heartbeat: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._member_sweep: asyncio.TimerHandle | None = None
        # Keys of listed stream channels Redis refused to read: asked for again at each
        # heartbeat, so a key fixed in Redis (DEL, then XADD) serves again without a reload.
        self._refused_streams: set[bytes] = set()
        self._apply(config)

    def _apply(self, config: Config) -> None:
        """Take the settings read on the hot path from ``config``."""
        self.config = config
        self.ingest.apply(config)
        self.fanout.apply(config)
        self.replays.apply(config)
        self.budget.limit = config.limits.history_bytes
        # Resumes' windows of stream entries: at most a quarter of that besides.
        self.backfill.limit = config.limits.history_bytes // 4
        self.budget._settle()
        if self._expiry is not None:  # the interval may have changed: re-arm at once
            self._expiry.cancel()
            self._expire()

    # --- the parts, as the server and the HTTP app see them --------------------------

    @property
    def broker(self) -> PubSubSource | None:
        return self._broker

    @broker.setter
    def broker(self, broker: PubSubSource | None) -> None:
        self._broker = self.registry.broker = broker

    @property
    def streams(self) -> StreamSource | None:
        return self._streams

    @streams.setter
    def streams(self, streams: StreamSource | None) -> None:
        self._streams = self.registry.streams = streams

    @property
    def tap(self) -> Tap | None:
        """With workers: told of every change to the node's numbered state (the feed)."""
        return self._tap

    @tap.setter
    def tap(self, tap: Tap | None) -> None:
        self._tap = self.fanout.tap = self.registry.tap = tap

    @property
    def roster(self) -> Roster | None:
        return self.sessions.roster

    @roster.setter
    def roster(self, roster: Roster | None) -> None:
        self.sessions.roster = roster

    @property
    def on_control(self) -> Callable[[bytes, bytes], None] | None:
        """Told of every message on the control channel (the node's control plane)."""
        return self.ingest.on_control

    @on_control.setter
    def on_control(self, on_control: Callable[[bytes, bytes], None] | None) -> None:
        self.ingest.on_control = on_control

    @property
    def observe_delay(self) -> Callable[[float], None] | None:
        return self.fanout.observe_delay

    @observe_delay.setter
    def observe_delay(self, observe: Callable[[float], None] | None) -> None:
        self.fanout.observe_delay = observe

    @property
    def families(self) -> Families:
        return self.registry.families

    @property
    def members(self) -> Counter[str]:
        """Live members per family."""
        return self.registry.members

    @property
    def epoch(self) -> str:
        return self.numbering.epoch

    @epoch.setter
    def epoch(self, epoch: str) -> None:
        self.numbering.epoch = epoch

    @property
    def seq(self) -> int:
        """The last sequence number handed out."""
        return self.numbering.seq

    @seq.setter
    def seq(self, seq: int) -> None:
        self.numbering.seq = seq

    @property
    def outage_seq(self) -> int:
        """Positions up to this one predate the last Redis outage."""
        return self.numbering.outage_seq

    @outage_seq.setter
    def outage_seq(self, seq: int) -> None:
        self.numbering.outage_seq = seq

    def position(self) -> str:
        """The id of the current position: everything up to now has been delivered."""
        return self.numbering.position()

    @property
    def connections(self) -> int:
        """Open streams across all channels."""
        return self._connections

    @property
    def catching_up(self) -> int:
        """Streams still replaying what they missed (not yet live)."""
        return len(self.replays.catching_up)

    @property
    def replay_bound(self) -> int:
        """Bytes a replay may put in a transport's buffer before it waits for the client."""
        return self.replays.bound

    @property
    def upstream_ready(self) -> bool:
        """Subscribed to every pub/sub channel, and reading every stream channel."""
        if self._broker is not None and not self._broker.ready:
            return False
        return not self._by_stream or self._streams is None or self._streams.ready

    def redis_channels(self) -> list[bytes]:
        """The Redis channels the broker must subscribe to."""
        return self.registry.redis_channels()

    def sharded(self, redis_channel: bytes) -> bool:
        """With Redis Cluster: True when ``redis_channel`` is published with SPUBLISH."""
        return self.registry.sharded(redis_channel)

    def stream_keys(self) -> list[bytes]:
        """The stream keys the stream reader must read."""
        return self.registry.stream_keys()

    def stream_prefill(self, key: bytes) -> int:
        """Recent entries of ``key`` to read when it starts: what its channels keep."""
        return self.registry.stream_prefill(key)

    def stream_maxlen(self, key: bytes) -> int:
        """The length to trim ``key`` to (``stream_maxlen``; 0: leave it to publishers)."""
        return self.registry.stream_maxlen(key)

    def groups(self) -> Iterable[Group]:
        """Every group of subscribers."""
        return self.fanout.groups()

    def flush(self) -> None:
        """Write what was taken in so far to every stream now."""
        self.fanout.flush()

    def mux_event(self, channel: Channel, raw: bytes, event_id: bytes) -> bytes:
        """``raw`` (a channel's event, its id line first) as /events carry it."""
        return self.fanout.mux_bytes(channel, (0, "", raw, 0.0), event_id)

    def reload(self, config: Config) -> tuple[list[str], list[str], list[str]]:
        """Apply a new config: returns the channels and families (added, removed, changed).

        Streams of removed channels, and of members no family serves any more, end
        cleanly; every other stream stays connected.
        """
        self.fanout.flush()
        changes = self.registry.reload(config)
        self._apply(config)
        if self._broker is not None:
            self._broker.set_channels(self.redis_channels())
        if self._streams is not None:
            self._streams.set_streams(self._by_stream)
        return changes

    def stream_failed(self, key: bytes, reason: str) -> None:
        """Redis refused to read ``key`` (it holds no stream: with a family, a name a
        client chose), and the reader dropped it: its members go, ending their streams
        (a browser that comes back tries the key once more); a listed channel's streams
        end, and its key is tried again at the next heartbeat (browsers that come back
        meanwhile wait with heartbeats, as while Redis is away)."""
        listed = False
        for channel in list(self._by_stream.get(key, ())):
            self.stats.stream_errors[channel.label] += 1
            if channel.family is not None:
                self.registry.remove_member(channel, "stream_error")
            else:
                listed = True
        if listed:
            self._refused_streams.add(key)
            self.end_listed_stream(key)
            if self._tap is not None:  # (a member's removal reaches the workers as such)
                self._tap.stream_failed(key)

    def end_listed_stream(self, key: bytes) -> None:
        """End the streams of the listed channels read from ``key`` (with workers: main's
        reader was refused it, and each worker ends its own)."""
        for channel in list(self._by_stream.get(key, ())):
            if channel.family is None:
                self._end(channel, "stream_error")

    def _retry_refused_streams(self) -> None:
        """Ask the reader again for listed channels' keys it was refused (one start read
        each per heartbeat: a key still wrong fails again, alone, and is counted)."""
        keys = {k for k in self._refused_streams if k in self._by_stream}
        self._refused_streams.clear()
        if keys and self._streams is not None:
            self._streams.want(keys)

    def signal_outage(self, seq: int | None = None) -> None:
        """After a Redis outage: tell every stream that events may have been lost.

        Resumes from positions before this point get the same signal, since what
        Redis published while the hub was away never reached the history. A worker
        passes the position the node's hub gave the outage.
        """
        self.fanout.flush()
        numbering = self.numbering
        numbering.seq = numbering.seq + 1 if seq is None else seq
        numbering.outage_seq = numbering.seq
        if self._tap is not None:
            self._tap.outage(numbering.seq)
        self.fanout.outage()

    # --- streams ------------------------------------------------------------------

    def acquire(self, names: Sequence[str]) -> tuple[Channel, ...]:
        """Hold the channels a new stream follows, creating family members as needed.

        Raises ``Unknown`` for names nothing serves, ``Refused`` when new members
        would pass a bound. Every successful call needs a ``release``.
        """
        return self.registry.acquire(names)

    def release(self, channels: Sequence[Channel]) -> None:
        """A stream that held ``channels`` is gone; members no stream holds start their grace."""
        self.registry.release(channels)

    def drop_idle_members(self, now: float | None = None) -> int:
        """Drop members whose grace is over (all idle ones when ``now`` is None)."""
        return self.registry.drop_idle_members(now)

    def refuses_group(self, channels: Sequence[Channel]) -> bool:
        """Whether ``channels`` would be a new /events group past ``max_event_groups``."""
        return self.fanout.refuses_group(channels)

    def subscribe(
        self, sub: Subscriber, last_event_id: str | None, mux: bool, rewind: int | None = None
    ) -> bool:
        """Start ``sub``'s stream: what it missed, then live events (see ``Replays``);
        a first connection starts with each channel's last ``rewind`` events (None:
        each channel's own ``rewind``).

        True when the stream is live; False while history is left to replay: the
        handler then awaits the client's reading and calls ``catch_up`` until True.
        A stream whose channel was removed (a reload, a member's grace) while it
        waited or caught up from Redis just ends: registered there, it would get no
        event and no heartbeat ever again.
        """
        if any(self.channels.get(c.name) is not c for c in sub.channels):
            self.stats.closed["channel_removed"] += 1
            sub.end("channel_removed")  # the browser comes back, to what is there now
            return True
        self._connections += 1
        return self.replays.subscribe(sub, last_event_id, mux, rewind)

    async def caught_up(
        self, last_event_id: str | None, channels: Sequence[Channel] = (), mux: bool = False
    ) -> None:
        """Returns once this hub has taken in everything up to ``last_event_id``
        (at once here; a worker may still be receiving it from its node's feed)."""

    def catch_up(self, sub: Subscriber) -> bool:
        """Write the next part of ``sub``'s replay, as much as the bound allows;
        True once the stream is live (or was ended meanwhile)."""
        return self.replays.catch_up(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        """Stop delivering to ``sub`` and count why it ended."""
        group = sub.group
        if group is None:
            return
        if not self.replays.forget(sub) and not group.remove(sub):
            return
        self._connections -= 1
        reason = sub.reason or "client_gone"
        self.stats.closed[reason] += 1
        self.sessions.left(sub, reason)
        self.fanout.release_group(group)

    def _end(self, channel: Channel, reason: str) -> None:
        """End every stream of ``channel`` cleanly, the live ones and those catching up."""
        self.fanout.end(channel, reason)
        self.replays.end(channel, reason)

    def close_all(self, reason: str) -> None:
        """End every stream cleanly (shutdown): browsers reconnect, elsewhere or later."""
        for group in list(self.fanout.groups()):
            for sub in group.subscribers():
                sub.end(reason)
        self.replays.end(None, reason)

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
        aging = self.registry.aging
        ttls = [h.ttl for h in aging]
        interval = min(max(min(ttls) / 2, 0.05), 30.0) if ttls else 30.0
        # Re-armed first, as the heartbeat: nothing below may stop it for good.
        self._expiry = asyncio.get_running_loop().call_later(interval, self._expire)
        for history in list(aging):
            history.expire()

    def _beat(self) -> None:
        interval = self.config.heartbeat
        # Re-armed first: whatever happens below, keepalives must not stop for good.
        self._heartbeat = asyncio.get_running_loop().call_later(interval, self._beat)
        self.fanout.beat(interval)
        self.replays.beat()
        self.backfill.beat(interval)
        if self._refused_streams:
            self._retry_refused_streams()

    def _sweep_members(self) -> None:
        loop = asyncio.get_running_loop()
        # Re-armed first, like the heartbeat: an error below must not stop the sweeps.
        self._member_sweep = loop.call_later(MEMBER_SWEEP, self._sweep_members)
        self.registry.drop_idle_members(time.monotonic())
