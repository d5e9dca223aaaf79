"""Every channel of one process by name, what feeds each, and family members' lifetime.

The registry holds the listed channels and the live family members, indexed by the
Redis channel (or stream key) that feeds them, and tells the hub's upstream -- the
broker for pub/sub, the stream reader for streams -- what to follow.

A member (``user.42`` of ``user.*``) is a channel created when the first stream asks
for it, subscribed in Redis (or its stream read) through the upstream, and dropped,
with its history, once no stream has held it for the family's ``grace``. One hub-wide
sweep does the dropping (``drop_idle_members``, timed by the hub): no timer per member.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from ..config import Config
from ..core.families import Families, Family
from ..core.history import Budget, History
from ..core.ids import Numbering
from .channel import Channel, Tap
from .stats import Stats

__all__ = ["MEMBER_SWEEP", "Follows", "Refused", "Registry", "Unknown"]

# Seconds between sweeps for family members whose grace period is over.
MEMBER_SWEEP = 0.5

# Recent entries read when a stream starts (so resumes need no round trip), at most:
# a channel's whole `history` up to this (its bytes stay within `history_bytes`).
_MAX_PREFILL = 10_000


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


class Follows(Protocol):
    """An upstream told which Redis channels (or stream keys) to follow."""

    def want(self, keys: Iterable[bytes]) -> None: ...
    def drop(self, keys: Iterable[bytes]) -> None: ...


class Registry:
    """Listed channels and live family members, by name and by what feeds them."""

    def __init__(
        self,
        config: Config,
        stats: Stats,
        budget: Budget,
        numbering: Numbering,
        end: Callable[[Channel, str], None],
    ) -> None:
        self.config = config
        self.stats = stats
        self.budget = budget
        self.numbering = numbering
        # A new member's position marker: the next number here, or (a worker, whose
        # numbers are the node's) the current one until the node's marker arrives.
        self.numbers = True
        # Ends every stream of a channel (its live groups and those catching up).
        self._end = end
        # Listed channels and live family members, by name.
        self.channels: dict[str, Channel] = {}
        self.families = Families(())
        self.members: Counter[str] = Counter()  # live members per family
        # Members no stream holds, by grace, each oldest first: name -> deadline.
        self.idle: dict[float, dict[Channel, float]] = {}
        # Keyed by the raw Redis channel name, as the broker reads it off the wire,
        # and by stream key.
        self.by_redis: dict[bytes, list[Channel]] = {}
        self.by_stream: dict[bytes, list[Channel]] = {}
        self.aging: set[History] = set()  # histories with an age bound, for the expiry timer
        self.juggernaut: bytes | None = None
        # The control channel (disconnects, refusals: redis/control.py), on the same
        # subscription as the channels, classic pub/sub also on a Cluster.
        self.control = b""
        # The Redis side, told what to follow (set by the server): pub/sub channels
        # through the broker, stream channels through the stream reader.
        self.broker: Follows | None = None
        self.streams: Follows | None = None
        self.tap: Tap | None = None
        for ch in config.channels.values():
            if not ch.family:
                self.channels[ch.name] = Channel(ch, budget)
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Take ``config``'s families and Redis names, and index the channels."""
        self.config = config
        self.juggernaut = (
            config.juggernaut.redis_channel.encode() if config.juggernaut.enabled else None
        )
        self.control = config.control.redis_channel.encode()
        self.families = Families(config.channels.values())
        # Refilled, never replaced: the hub's input holds these very dicts.
        self.by_redis.clear()
        self.by_stream.clear()
        for channel in self.channels.values():
            self.index(channel).setdefault(channel.redis, []).append(channel)
        self.aging = {c.history for c in self.channels.values() if c.history.ttl > 0}

    def index(self, channel: Channel) -> dict[bytes, list[Channel]]:
        return self.by_stream if channel.stream else self.by_redis

    def upstream(self, channel: Channel) -> Follows | None:
        return self.streams if channel.stream else self.broker

    def reload(self, config: Config) -> tuple[list[str], list[str], list[str]]:
        """Apply a new config: returns the channels and families (added, removed, changed).

        Streams of removed channels, and of members no family serves any more, end
        cleanly; every other stream stays connected.
        """
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
                self.remove_member(member)
                continue
            family, part = found
            grace = family.config.grace
            idle = self.idle.get(member.config.grace, {})
            if member in idle and grace != member.config.grace:
                del idle[member]  # re-queued under its new grace, still in deadline order
                self.idle.setdefault(grace, {})[member] = time.monotonic() + grace
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
        self.apply(config)
        return added, removed, changed

    def redis_channels(self) -> list[bytes]:
        """The Redis channels the broker must subscribe to."""
        names = set(self.by_redis)
        names.add(self.control)
        if self.juggernaut is not None:
            names.add(self.juggernaut)
        return sorted(names)

    def sharded(self, redis_channel: bytes) -> bool:
        """With Redis Cluster: True when ``redis_channel`` is published with SPUBLISH."""
        channels = self.by_redis.get(redis_channel)
        # Juggernaut publishers use classic PUBLISH, as they always did.
        return channels is not None and all(c.config.sharded for c in channels)

    def stream_keys(self) -> list[bytes]:
        """The stream keys the stream reader must read."""
        return sorted(self.by_stream)

    def stream_prefill(self, key: bytes) -> int:
        """Recent entries of ``key`` to read when it starts: what its channels keep."""
        kept = max((c.config.history for c in self.by_stream.get(key, ())), default=0)
        return min(_MAX_PREFILL, kept)

    def stream_maxlen(self, key: bytes) -> int:
        """The length to trim ``key`` to (``stream_maxlen``; 0: leave it to publishers)."""
        return max((c.config.stream_maxlen for c in self.by_stream.get(key, ())), default=0)

    # --- family members -------------------------------------------------------------

    def acquire(self, names: Sequence[str]) -> tuple[Channel, ...]:
        """Hold the channels a new stream follows, creating family members as needed.

        Raises ``Unknown`` for names nothing serves, ``Refused`` when new members
        would pass a bound (see ``_admit``). Every successful call needs a ``release``.
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
            if match is None or match[0].redis_channel(match[1]) in (self.juggernaut, self.control):
                unknown.append(name)
            else:
                new.append((name, *match))
        if unknown:
            raise Unknown(unknown)
        if new:
            self._admit(new)
        created = {name: self.create_member(name, family, part) for name, family, part in new}
        channels = tuple(
            c if c is not None else created[n] for c, n in zip(found, names, strict=True)
        )
        for channel in channels:
            channel.holds += 1
            if channel.family is not None:
                self.idle.get(channel.config.grace, {}).pop(channel, None)
        return channels

    def _admit(self, new: list[tuple[str, Family, str]]) -> None:
        """``Refused`` when a stream's new members would pass a bound: more than
        ``limits.max_new_members_per_connection`` at once, or a family's own
        ``max_members`` (default ``limits.max_members``). Each family counts alone:
        anonymous streams filling a public family never turn a private one's away."""
        limits = self.config.limits
        reason = None
        cap = limits.max_new_members_per_connection
        if cap and len(new) > cap:
            reason = "max_new_members_per_connection"
        else:
            wanted = Counter(family.name for _, family, _ in new)
            for _, family, _ in new:
                bound = family.config.max_members or limits.max_members
                if self.members[family.name] + wanted[family.name] > bound:
                    reason = "max_members"
                    break
        if reason is not None:
            for _, family, _ in new:
                self.stats.members_refused[family.name] += 1
            raise Refused(reason)

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
                self.remove_member(channel)
            else:
                self.idle.setdefault(grace, {})[channel] = now + grace

    def create_member(
        self, name: str, family: Family, part: str, marker: int | None = None
    ) -> Channel:
        """A new member ``name``; ``marker``: the position the node gave it (a worker)."""
        channel = Channel(family.config, self.budget, name, family, family.redis_channel(part))
        if channel.history.ttl > 0:
            self.aging.add(channel.history)
        # Nothing before this point reached the new member: positions handed out so
        # far (which are <= seq) get a gap; the new member's own positions come later.
        # A worker takes the marker the node's hub gave the member instead.
        if marker is None:
            if self.numbers:
                self.numbering.seq += 1
            marker = self.numbering.seq
        channel.history.evicted_seq = marker
        self.channels[name] = channel
        self.members[family.name] += 1
        others = self.index(channel).setdefault(channel.redis, [])
        others.append(channel)
        upstream = self.upstream(channel)
        if len(others) == 1 and upstream is not None:
            upstream.want((channel.redis,))
        if self.tap is not None:
            self.tap.member(channel)
        return channel

    def remove_member(self, channel: Channel, reason: str = "channel_removed") -> None:
        """Forget a member: end its streams (if any), unsubscribe, drop its history."""
        if self.channels.get(channel.name) is not channel:
            return
        self._end(channel, reason)
        del self.channels[channel.name]
        channel.history.clear()  # its bytes leave the hub-wide budget now
        self.aging.discard(channel.history)
        self.members[channel.label] -= 1
        if not self.members[channel.label]:
            del self.members[channel.label]
        self.idle.get(channel.config.grace, {}).pop(channel, None)
        index = self.index(channel)
        others = index.get(channel.redis, [])
        if channel in others:
            others.remove(channel)
        if not others:
            index.pop(channel.redis, None)
            upstream = self.upstream(channel)
            if upstream is not None:
                upstream.drop((channel.redis,))
        if self.tap is not None:
            self.tap.removed(channel)

    def drop_idle_members(self, now: float | None = None) -> int:
        """Drop members whose grace is over (all idle ones when ``now`` is None)."""
        dropped = 0
        for idle in self.idle.values():
            while idle:
                channel, deadline = next(iter(idle.items()))
                if now is not None and deadline > now:
                    break  # each dict is in deadline order: the rest are later
                del idle[channel]
                self.stats.members_dropped[channel.label] += 1
                self.remove_member(channel)
                dropped += 1
        return dropped
