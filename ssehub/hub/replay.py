"""The resume seam: what a new stream missed, written as the client reads it, then live.

``Hub.subscribe`` resolves the client's position (per channel: the hub's numbering, a
publisher's id, or a stream channel's entry id: see resume.py), signals what cannot be
replayed (``ssehub-gap``), and replays the rest from the histories without ever putting
more than the replay bound into the transport: the stream keeps a position (``Replay``),
never a copy, and its handler waits on the transport (``drain``) between parts. The last
part, the position marker and the registration in the live group are one synchronous
step, after a flush, so every event is either in the replay or arrives live behind it.

``Replays`` does this for the hub; it writes through the hub's ``Fanout`` (whose
flush and groups it shares) and registers streams with its ``Sessions``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence

from ..config import Config
from ..core import sse
from ..core.history import ID, RAW, SEQ, Entry
from ..core.ids import Numbering, just_before, mux_id, split_mux_id
from .channel import Channel, MuxGroup, Subscriber, streams_of
from .fanout import Fanout
from .resume import gap_event
from .sessions import Sessions
from .stats import Stats

__all__ = ["Replay", "Replays"]


def _entry_seq(tagged: tuple[Channel, Entry]) -> int:
    return tagged[1][SEQ]


class Replay:
    """A resuming stream catching up with history: where it is, not what is left.

    Lives only until the stream goes live; costs no task or timer of its own.
    """

    __slots__ = (
        "floors",
        "last_id",
        "mux",
        "pos",
        "positions",
        "reported",
        "seen",
        "sub",
    )

    def __init__(self, sub: Subscriber, last_id: str, mux: bool) -> None:
        self.sub = sub
        self.pos = -1  # hub seq of the last event written
        # Per channel, the hub seq it resumes after: the client's position in it.
        self.floors: dict[Channel, int] = {}
        # /events: each stream channel's entry id as the client has it, for the ids.
        self.positions: dict[Channel, str] = {}
        self.last_id = last_id  # the last event's id as the client saw it, for gap events
        self.mux = mux
        # Per channel, the newest eviction already signalled: each loss is told once.
        self.reported: dict[Channel, int] = {}
        self.seen = -1  # pos at the previous heartbeat: unchanged for a whole beat = stuck


class Replays:
    """Resolving positions, replaying what was missed, going live."""

    def __init__(
        self,
        config: Config,
        stats: Stats,
        numbering: Numbering,
        fanout: Fanout,
        sessions: Sessions,
    ) -> None:
        self.stats = stats
        self.numbering = numbering
        self.fanout = fanout
        self.sessions = sessions
        # Streams still replaying what they missed (not yet live).
        self.catching_up: dict[Subscriber, Replay] = {}
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Take the replay bound from ``config``."""
        # A replay fills at most half the bound (plus one event), so the stream goes
        # live with room for the live events behind it before it would count as slow.
        self.bound = max(config.limits.max_buffer_bytes // 2, 1)

    def subscribe(
        self, sub: Subscriber, last_event_id: str | None, mux: bool, rewind: int | None = None
    ) -> bool:
        """Start ``sub``'s stream: what it missed, then live events; no gap, no duplicate.

        A first connection (no ``last_event_id``) starts with each channel's last
        ``rewind`` kept events instead, then live; ``rewind`` None: as many as each
        channel's own ``rewind`` says.

        True when the stream is live. False when history is left to replay: the
        handler then awaits the client's reading (``drain``) and calls ``catch_up``,
        again until that returns True; meanwhile the hub keeps a position, never a
        copy of what is left. The history snapshot, the last replay write and the
        registration happen in one synchronous step, so every event is either in the
        replay or arrives live behind it.
        """
        self.fanout.flush()  # events already taken in reach current subscribers first
        sub.group = self.fanout.group(sub.channels, mux)
        for channel in sub.channels:
            self.stats.opened[channel.label] += 1
        if last_event_id is None:
            counts = [c.config.rewind if rewind is None else rewind for c in sub.channels]
            if any(counts):
                return self._rewind(sub, mux, counts)
        found = None if last_event_id is None else self._resolve(last_event_id, sub.channels, mux)
        if last_event_id is None or found is None or not any(found.values()):
            # Even a fresh stream gets a position (the marker), so that its reconnect
            # carries a Last-Event-ID and anything missed meanwhile is replayed or signalled.
            unknown = b""
            if last_event_id is not None:
                for channel in sub.channels:
                    self.stats.gaps[channel.label] += 1
                    unknown += gap_event(channel.name, "unknown_id", last_event_id)
            self.sessions.joined(sub, live=True)
            self._go_live(sub, unknown)
            return True
        replay = Replay(sub, last_event_id, mux)
        gaps: list[bytes] = []
        for channel in sub.channels:
            resolved = found[channel]
            if resolved is None:
                # This channel's position is not ours (another node's, say): live only.
                replay.floors[channel] = self.numbering.seq
                replay.positions[channel] = channel.stream_pos
                self.stats.gaps[channel.label] += 1
                gaps.append(gap_event(channel.name, "unknown_id", last_event_id))
                continue
            n, position = resolved
            replay.floors[channel] = n
            replay.positions[channel] = position
            history = channel.history
            history.expire()
            reason = None
            # Events after n fell out of the history, or (a new member) came before
            # the channel existed here.
            if history.evicted_seq > n:
                reason = "expired"
                replay.reported[channel] = history.evicted_seq
            if n < channel.last_seq and history.has_after(n):
                self.stats.replays[channel.label] += 1
            if reason is None and n < self.numbering.outage_seq and not channel.stream:
                reason = "redis_outage"  # (a stream reader's outage loses nothing)
            if reason is not None:
                self.stats.gaps[channel.label] += 1
                gaps.append(gap_event(channel.name, reason, last_event_id))
        return self._start_replay(replay, b"".join(gaps))

    def _start_replay(self, replay: Replay, head: bytes) -> bool:
        sub = replay.sub
        self.catching_up[sub] = replay
        self.sessions.joined(sub, live=False)
        if isinstance(sub.group, MuxGroup):
            sub.group.joining += 1
        # The transport pauses (and drain() waits) once the replay has put more than
        # the bound into its buffer.
        sub.transport.set_write_buffer_limits(high=self.bound)
        return self._catch_up(replay, head)

    def _rewind(self, sub: Subscriber, mux: bool, counts: list[int]) -> bool:
        """A first connection that starts with each channel's last ``counts`` events."""
        replay = Replay(sub, "", mux)
        for channel, count in zip(sub.channels, counts, strict=True):
            start = channel.history.nth_last(count)
            if start is None:  # nothing kept: live only
                replay.floors[channel] = self.numbering.seq
                replay.positions[channel] = channel.flushed_pos
                continue
            replay.floors[channel] = start[SEQ] - 1
            # Where the stream stood before it: that entry's id when kept, else an id
            # just before the first one rewound (a resume from it reads on from there).
            before = channel.history.id_at(start[SEQ] - 1)
            replay.positions[channel] = before or just_before(start[ID])
        replay.last_id = self.fanout.position(sub.channels, mux)
        return self._start_replay(replay, b"")

    def catch_up(self, sub: Subscriber) -> bool:
        """Write the next part of ``sub``'s replay, as much as the bound allows;
        True once the stream is live (or was ended meanwhile)."""
        replay = self.catching_up.get(sub)
        return True if replay is None else self._catch_up(replay, b"")

    def _catch_up(self, r: Replay, head: bytes) -> bool:
        sub = r.sub
        transport = sub.transport
        if transport.is_closing():
            return True  # gone: the handler's cancellation unsubscribes it
        parts = [head] if head else []
        for channel in sub.channels:
            # Evicted past the position since the last part: say so at this point.
            evicted = channel.history.evicted_seq
            at = max(r.floors[channel], r.pos)
            if evicted > at and evicted > r.reported.get(channel, 0):
                r.reported[channel] = evicted
                self.stats.gaps[channel.label] += 1
                parts.append(gap_event(channel.name, "expired", r.last_id))
        # Write while the buffer is under the bound: at most the bound plus one event.
        room = self.bound - transport.get_write_buffer_size()
        last: Entry | None = None
        streams = streams_of(sub.channels) if r.mux else ()
        epoch = self.numbering.epoch
        mux_bytes = self.fanout.mux_bytes
        skip = self.sessions.skips(sub.session)
        for channel, e in self._after(sub.channels, r):
            if room < 0:
                break
            if r.mux and channel.stream:
                r.positions[channel] = e[ID]
            if skip is not None and e[SEQ] in skip:
                continue  # excepted for this stream (its session was excluded)
            if r.mux:
                event_id = mux_id(epoch, e[SEQ], [r.positions[c] for c in streams])
                data = mux_bytes(channel, e, event_id.encode())
            else:
                data = e[RAW]
            parts.append(data)
            room -= len(data)
            last = e
        else:
            if room >= 0:
                del self.catching_up[sub]
                self._go_live(sub, b"".join(parts))
                if isinstance(sub.group, MuxGroup):  # only now: _go_live may cut others
                    sub.group.joining -= 1
                return True
        if last is not None:
            r.pos = last[SEQ]
            r.last_id = (
                mux_id(epoch, r.pos, [r.positions[c] for c in streams]) if r.mux else last[ID]
            )
        raw = b"".join(parts)
        if raw:
            transport.write(sse.chunk(raw) if sub.chunked else raw)
        return False

    def _after(self, channels: Sequence[Channel], r: Replay) -> Iterable[tuple[Channel, Entry]]:
        """The retained entries of ``channels`` still to replay to ``r``, in hub order:
        each channel's after its own position, and all after what was written."""
        if len(channels) == 1:
            c = channels[0]
            return zip(itertools.repeat(c), c.history.after(max(r.floors[c], r.pos)))
        return heapq.merge(
            *(zip(itertools.repeat(c), c.history.after(max(r.floors[c], r.pos))) for c in channels),
            key=_entry_seq,
        )

    def _go_live(self, sub: Subscriber, head: bytes) -> None:
        """Write the last of the replay and the position marker, and register ``sub``:
        one synchronous step, after the events taken in so far were flushed."""
        self.fanout.flush()
        position = self.fanout.position(sub.channels, isinstance(sub.group, MuxGroup))
        raw = head + b"id: %s\n\n" % position.encode()
        sub.transport.write(sse.chunk(raw) if sub.chunked else raw)
        assert sub.group is not None
        sub.group.add(sub)
        self.sessions.went_live(sub)

    def _resolve(
        self, last_event_id: str, channels: Sequence[Channel], mux: bool
    ) -> dict[Channel, tuple[int, str] | None]:
        """A client's Last-Event-ID as, per channel, the hub seq to resume after and
        (stream channels) the entry id it stands for; None where it is not known here."""
        if not mux:
            (channel,) = channels
            if channel.stream:
                return {channel: self._stream_floor(channel, last_event_id)}
            n = self.numbering.own(last_event_id)
            if n is None:
                n = channel.history.seq_of(last_event_id)  # a publisher-given id
            return {channel: None if n is None else (n, "")}
        streams = streams_of(channels)
        hub_part, positions = split_mux_id(last_event_id, len(streams))
        n = self.numbering.own(hub_part)
        out: dict[Channel, tuple[int, str] | None] = {}
        for channel in channels:
            if not channel.stream:
                out[channel] = None if n is None else (n, "")
        for i, channel in enumerate(streams):
            if positions is not None:
                out[channel] = self._stream_floor(channel, positions[i])
            elif n is not None:
                # Positions of ours, but not per stream: the hub order says where.
                at = channel.history.id_at(n)
                if at is None and channel.last_seq <= n:
                    at = channel.stream_pos
                out[channel] = None if at is None else (n, at)
            else:
                out[channel] = None
        return out

    def _stream_floor(self, channel: Channel, entry_id: str) -> tuple[int, str] | None:
        """Where a stream channel's client at ``entry_id`` resumes from memory, or None."""
        if entry_id == channel.stream_pos:
            return (
                self.numbering.seq,
                entry_id,
            )  # at the newest entry (its id may be a start marker)
        n = channel.history.seq_of(entry_id)
        return None if n is None else (n, entry_id)

    def forget(self, sub: Subscriber) -> bool:
        """``sub`` was still catching up: it is not any more (it went away)."""
        if self.catching_up.pop(sub, None) is None:
            return False
        if isinstance(sub.group, MuxGroup):
            sub.group.joining -= 1
        return True

    def end(self, channel: Channel | None, reason: str) -> None:
        """End the streams catching up (with ``channel``, or all of them) cleanly."""
        for sub in list(self.catching_up):
            if channel is None or channel in sub.channels:
                sub.end(reason)

    def beat(self) -> None:
        """At each heartbeat: a resumer whose replay did not move for a whole interval
        does not read; cut it."""
        for replay in list(self.catching_up.values()):
            if replay.pos == replay.seen:
                self.fanout.cut(replay.sub, self.bound)
            replay.seen = replay.pos
