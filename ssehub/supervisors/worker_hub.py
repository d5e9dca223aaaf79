"""A worker's hub: positions, members and outages come from the node's feed.

Numbers are the node's (main's hub numbers every message once): a worker's hub takes
numbered entries from the feed instead of numbering them, creates and drops family
members when main says so (and asks main to hold the ones its streams follow), and
makes a stream whose Last-Event-ID came from a quicker sibling wait a moment for the
feed to get there.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import Config
from ..core.ids import hub_part, parse_stream_id, split_mux_id
from ..core.waiters import Changes
from ..hub.channel import Channel, streams_of
from ..hub.hub import Hub
from .feed import FrameProtocol, Kind, Op

__all__ = ["WorkerHub"]


# Seconds a stream whose Last-Event-ID is ahead of this worker (it was handed out by
# a faster sibling) waits for the feed to catch up before it counts as unknown.
_CATCH_UP = 1.0


class WorkerHub(Hub):
    """A hub whose positions, members and outages come from the node's feed."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        # Members' markers are the node's: main's MEMBER frame brings each one.
        self.registry.numbers = False
        self.upstream: FrameProtocol | None = None
        # Members this worker told main it holds, by token, until it lets them go.
        self._held: dict[int, Channel] = {}
        # Streams waiting for the feed to reach their Last-Event-ID.
        # Resolved when the feed moves this worker's position on (see caught_up).
        self._advanced = Changes()

    def _send(self, op: Op) -> None:
        if self.upstream is not None:
            self.upstream.send([op])

    # --- members: created and dropped by main, for the whole node ------------------

    def acquire(self, names: Sequence[str]) -> tuple[Channel, ...]:
        """As ``Hub.acquire``; the first local stream of a member tells main (one frame)."""
        channels = super().acquire(names)
        for channel in channels:
            if channel.family is not None and id(channel) not in self._held:
                self._held[id(channel)] = channel
                self._send((Kind.HOLD, channel.name, id(channel)))
        return channels

    def release(self, channels: Sequence[Channel]) -> None:
        """No grace here: main keeps the member while any worker holds it, then the grace."""
        for channel in channels:
            channel.holds -= 1
            if channel.holds == 0 and self._held.pop(id(channel), None) is not None:
                self._send((Kind.RELEASE, channel.name, id(channel)))

    def add_member(self, name: str, marker: int) -> None:
        """The node created member ``name`` at position ``marker``: keep its history here too."""
        self.seq = max(self.seq, marker)
        channel = self.channels.get(name)
        if channel is not None:  # this worker's stream asked for it first
            channel.history.evicted_seq = max(channel.history.evicted_seq, marker)
            return
        found = self.families.find(name)
        if found is not None:
            self.registry.create_member(name, *found, marker=marker)

    def remove_member(self, name: str, reason: str = "channel_removed") -> Channel | None:
        """The node dropped ``name`` (or refused it): end its streams here."""
        channel = self.channels.get(name)
        if channel is not None and channel.family is not None:
            self.registry.remove_member(channel, reason)
            return channel
        return None

    def serves(self, redis_channel: bytes) -> bool:
        """True while a channel fed by ``redis_channel`` lives here."""
        return redis_channel in self._by_redis

    def serves_stream(self, key: bytes) -> bool:
        """True while a stream channel of stream ``key`` lives here."""
        return key in self._by_stream

    def stream_at(self, key: bytes, position: str, started: bool) -> None:
        """Main reads ``key`` on from ``position`` (entries it rejected move it too)."""
        for channel in self._by_stream.get(key, ()):
            channel.stream_pos = position
            if started:  # as Hub.stream_started: no subscriber here has seen anything yet
                channel.flushed_pos = position

    def refused(self, token: int) -> None:
        """Main turned a HOLD away (over ``max_members``, or unknown after a reload)."""
        channel = self._held.pop(token, None)
        if channel is not None and self.channels.get(channel.name) is channel:
            self.registry.remove_member(channel, "limit")

    # --- resume across workers ------------------------------------------------------

    async def caught_up(
        self, last_event_id: str | None, channels: Sequence[Channel] = (), mux: bool = False
    ) -> None:
        """Wait (at most ``_CATCH_UP`` s) until this worker's feed has reached the node
        position ``last_event_id`` names, and each stream channel's entry id in it: a
        client that saw it on a quicker worker must not get a gap here for what is
        merely still on its way."""
        if last_event_id is None:
            return
        await self._advanced.until(
            lambda: not self._behind(last_event_id, channels, mux), _CATCH_UP
        )

    def _behind(self, last_event_id: str, channels: Sequence[Channel], mux: bool) -> bool:
        if self._ahead(last_event_id) > self.seq:
            return True
        streams = streams_of(channels)
        if not streams:
            return False
        positions: list[str] | None = [last_event_id]
        if mux:
            _, positions = split_mux_id(last_event_id, len(streams))
        if positions is None or len(positions) != len(streams):
            return False
        for channel, position in zip(streams, positions, strict=True):
            wanted, at = parse_stream_id(position), parse_stream_id(channel.stream_pos)
            if wanted is not None and at is not None and wanted > at:
                return True
        return False

    def _ahead(self, last_event_id: str | None) -> int:
        """The position of ``last_event_id`` when it is the node's and past this worker's."""
        if last_event_id is None:
            return 0
        # (an /events id may carry stream positions after a '~': the node's part first)
        seq = self.numbering.seq_of(hub_part(last_event_id))
        return seq if seq is not None and seq > self.seq else 0

    def advanced(self) -> None:
        """The feed moved this worker's position on: wake the streams waiting for it."""
        self._advanced.changed()
