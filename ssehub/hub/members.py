"""Family members' lifetime: created on a stream's arrival, dropped after their grace.

A member (``user.42`` of ``user.*``) is a channel the hub creates when the first stream
asks for it, subscribes in Redis (or reads its stream) through the hub's upstream, and
drops, with its history, once no stream has held it for the family's ``grace``. One
hub-wide sweep does the dropping: no timer per member.

``Members`` is the part of ``Hub`` that does this; it is a mixin only to keep hub.py
about the hot path and the resume seam.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..core.families import Families, Family
from ..core.history import Budget, History
from .channel import Channel

if TYPE_CHECKING:
    from ..config import Config
    from ..redis.pubsub import Broker
    from ..redis.streams import StreamSource
    from .hub import Stats, Tap

__all__ = ["Members", "Refused", "Unknown"]

# Seconds between sweeps for family members whose grace period is over.
MEMBER_SWEEP = 0.5


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


class Members:
    """Creating, holding, releasing and dropping family members (part of ``Hub``)."""

    # What the hub provides (see Hub.__init__).
    config: Config
    stats: Stats
    channels: dict[str, Channel]
    families: Families
    members: Counter[str]
    budget: Budget
    seq: int
    tap: Tap | None
    _idle: dict[float, dict[Channel, float]]
    _member_sweep: asyncio.TimerHandle | None
    _aging: set[History]
    _juggernaut: bytes | None

    def _index(self, channel: Channel) -> dict[bytes, list[Channel]]:
        raise NotImplementedError

    def _upstream(self, channel: Channel) -> Broker | StreamSource | None:
        raise NotImplementedError

    def _end(self, channel: Channel, reason: str) -> None:
        raise NotImplementedError

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

    def _create_member(
        self, name: str, family: Family, part: str, marker: int | None = None
    ) -> Channel:
        channel = Channel(family.config, self.budget, name, family, family.redis_channel(part))
        if channel.history.ttl > 0:
            self._aging.add(channel.history)
        # Nothing before this point reached the new member: positions handed out so
        # far (which are <= seq) get a gap; the new member's own positions come later.
        # A worker takes the marker the node's hub gave the member instead.
        if marker is None:
            self.seq += 1
            marker = self.seq
        channel.history.evicted_seq = marker
        self.channels[name] = channel
        self.members[family.name] += 1
        others = self._index(channel).setdefault(channel.redis, [])
        others.append(channel)
        upstream = self._upstream(channel)
        if len(others) == 1 and upstream is not None:
            upstream.want((channel.redis,))
        if self.tap is not None:
            self.tap.member(channel)
        return channel

    def _remove_member(self, channel: Channel, reason: str = "channel_removed") -> None:
        """Forget a member: end its streams (if any), unsubscribe, drop its history."""
        if self.channels.get(channel.name) is not channel:
            return
        self._end(channel, reason)
        del self.channels[channel.name]
        channel.history.clear()  # its bytes leave the hub-wide budget now
        self._aging.discard(channel.history)
        self.members[channel.label] -= 1
        if not self.members[channel.label]:
            del self.members[channel.label]
        self._idle.get(channel.config.grace, {}).pop(channel, None)
        index = self._index(channel)
        others = index.get(channel.redis, [])
        if channel in others:
            others.remove(channel)
        if not others:
            index.pop(channel.redis, None)
            upstream = self._upstream(channel)
            if upstream is not None:
                upstream.drop((channel.redis,))
        if self.tap is not None:
            self.tap.removed(channel)

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
        self._member_sweep = loop.call_later(MEMBER_SWEEP, self._sweep_members)
        self.drop_idle_members(time.monotonic())
