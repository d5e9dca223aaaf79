"""Main's end of the feed: the node's changes out to every worker, its streams' in.

With ``workers: N`` the main process's node reads Redis and numbers every message;
the relay is told of every change (the hub's tap, the node's listener) and sends it to
every worker in order, one frame per event-loop iteration, the same bytes to each. A
new worker gets the node's state first (its snapshot: ``snapshot.py``). What workers'
streams do comes back: registrations and ends (written to Redis by main's events
writer, for the node), holds on family members (main creates and keeps them for the
node), refusals by credential (the control plane).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ..core.control import Command, Refuse
from ..core.history import Entry
from ..http.proxy_auth import ProxyAuth, ProxyGrant, Unavailable
from ..hub.channel import Channel
from ..hub.hub import Refused, Unknown
from ..node import Listener, Node
from ..redis.pubsub import BrokerState
from . import snapshot
from .feed import Batch, Kind, Op, frame
from .slots import Slot

__all__ = ["Relay"]


class Relay(Listener):
    """Main's end of every worker's feed (``node``: main's, set once it is built)."""

    def __init__(self, slots: Sequence[Slot], changed: Callable[[], None]) -> None:
        self.slots = slots
        self.node: Node | None = None
        self._changed = changed  # a source's state changed: readiness, systemd's status
        # The same bytes to every worker.
        self._out = Batch(self._to_all)
        self.push = self._out.push
        self.flush = self._out.flush
        # Streams per user on the node (every worker's), for limits.max_per_user.
        self.users: Counter[str] = Counter()
        # auth: proxy, asked for the workers (made on first use).
        self.proxy: ProxyAuth | None = None

    def _node(self) -> Node:
        assert self.node is not None
        return self.node

    # --- out: the hub's tap ---------------------------------------------------------

    def entry(
        self, channel: Channel, e: Entry, publisher_id: bool, exclude: tuple[str, ...]
    ) -> None:
        self.push((Kind.ENTRY, channel.name, e, publisher_id, exclude))

    def member(self, channel: Channel) -> None:
        self.push((Kind.MEMBER, channel.name, channel.history.evicted_seq))
        if not channel.stream:  # (a stream member is live once the reader starts it)
            self._node().tasks.spawn(self._announce_live(channel), "ssehub-announce", forever=False)

    def removed(self, channel: Channel) -> None:
        self.push((Kind.REMOVED, channel.name))

    def stream_failed(self, key: bytes) -> None:
        self.push((Kind.STREAM_FAILED, key))

    def outage(self, seq: int) -> None:
        self.push((Kind.OUTAGE, seq))

    async def _announce_live(self, channel: Channel) -> None:
        """Tell the workers once Redis confirms a new member (its streams wait for it)."""
        node = self._node()
        while node.hub.channels.get(channel.name) is channel:
            if await node.broker.wait_subscribed((channel.redis,), 5.0):
                if node.hub.channels.get(channel.name) is channel:
                    self.push((Kind.LIVE, channel.redis))
                return

    # --- out: the node's listener -----------------------------------------------------

    def stream_at(self, key: bytes, position: str, started: bool) -> None:
        """The workers get a stream's entries, then its position (``started``: from then
        on its streams there are live)."""
        self.push((Kind.STREAM, key, position, started))

    def streams_state(self, old: BrokerState, new: BrokerState) -> None:
        # Nothing is lost on stream channels: the reader goes on from its positions.
        self.push((Kind.STREAMS, new.value))
        self._changed()

    def redis_state(self, old: BrokerState, new: BrokerState) -> None:
        # (The node dropped idle members, and numbered an outage, before this.)
        self.push((Kind.STATE, new.value, self._node().broker.reconnects))
        self._changed()

    def control_message(self, command: Command) -> None:
        """Every worker carries a control message out (main keeps the refusals)."""
        self.push((Kind.CONTROL, command))

    def refusals_read(self, refusals: list[Refuse]) -> None:
        self.push((Kind.REFUSALS, refusals))

    # --- the frames -------------------------------------------------------------------

    def _to_all(self, data: bytes) -> None:
        for slot in self.slots:
            slot.write(data)

    def send(self, slot: Slot, ops: list[Op]) -> None:
        """To one worker, behind everything the node sent before."""
        self.flush()
        slot.write(frame(ops))

    def snapshot(self, **main: Any) -> snapshot.Snapshot:
        """The node's state for a new worker (``main``: what only main's process knows).
        What the node numbered so far goes to the other workers first: the new one gets
        it in the snapshot, and the frames after it from now on."""
        self.flush()
        node = self._node()
        hub, broker, reader = node.hub, node.subscriber, node.reader
        assert broker is not None and reader is not None
        members = [c for c in hub.channels.values() if c.family is not None]
        return snapshot.take(
            hub,
            **main,
            state=broker.state.value,
            reconnects=broker.reconnects,
            live=[c.redis for c in members if c.redis in broker.subscribed],
            streams=[k for k in hub.stream_keys() if reader.live(k)],
            streams_state=reader.state.value,
            refusals=[Refuse(k, u) for k, u in node.control.refusals.items()],
        )

    # --- in: what workers' streams do ----------------------------------------------------

    def take(self, slot: Slot, op: Op) -> bool:
        """Apply ``op`` from ``slot`` if it is about its streams; False if it is not."""
        node = self._node()
        writer = node.reporter  # (main's: it reads Redis for the node)
        assert writer is not None
        kind = op[0]
        if kind == Kind.JOIN:
            _, channel, session, meta, presence = op
            slot.sessions[(channel, session)] = (meta, presence)
            writer.join(channel, session, meta, presence)
        elif kind == Kind.LEAVE:
            _, channel, session, meta, reason, presence = op
            if slot.sessions.pop((channel, session), None) is not None:
                writer.leave(channel, session, meta, reason, presence)
        elif kind == Kind.REFUSE:
            # A worker refused a session by its credential: main keeps it, stores it
            # and tells every node (whose workers, this one's siblings too, hear it).
            node.control.apply(op[1])
            if node.plane is not None:
                node.plane.refuse(op[1])
        elif kind == Kind.HOLD:
            self._hold(slot, op[1], op[2])
        elif kind == Kind.RELEASE:
            self._release(slot, op[2])
        elif kind == Kind.USER_HOLD:
            self._user_hold(slot, op[1], op[2])
        elif kind == Kind.USER_RELEASE:
            self._user_release(slot, op[1])
        elif kind == Kind.PROXY_ASK:
            node.tasks.spawn(self._proxy_answer(slot, *op[1:]), "ssehub-proxy", forever=False)
        else:
            return False
        return True

    def _hold(self, slot: Slot, name: str, token: int) -> None:
        """A stream on ``slot`` holds member ``name`` (the worker's ``token`` for it)."""
        try:
            (slot.held[token],) = self._node().hub.acquire([name])
        except (Unknown, Refused):
            self.send(slot, [(Kind.REFUSED, token)])

    def _release(self, slot: Slot, token: int) -> None:
        channel = slot.held.pop(token, None)
        if channel is not None:
            self._node().hub.release([channel])

    def _user_hold(self, slot: Slot, user: str, token: int) -> None:
        """One more stream of ``user`` on ``slot``, if the node has fewer than the limit."""
        limit = self._node().config.limits.max_per_user
        granted = not limit or self.users[user] < limit
        if granted:
            self.users[user] += 1
            slot.users[token] = user
        self.send(slot, [(Kind.USER_ANSWER, token, granted)])

    def _user_release(self, slot: Slot, token: int) -> None:
        user = slot.users.pop(token, None)
        if user is not None:
            self.users[user] -= 1
            if self.users[user] <= 0:
                del self.users[user]

    async def _proxy_answer(
        self, slot: Slot, token: int, key: str, names: list[str], cookies: dict[str, str]
    ) -> None:
        """Ask the application for a worker's stream (or answer from the node's cache)."""
        node = self._node()
        if self.proxy is None:
            self.proxy = ProxyAuth(lambda: node.config, node.control.stats)
        result: ProxyGrant | str
        try:
            result = await self.proxy.answer(key, names, cookies)
        except Unavailable as exc:
            result = str(exc) or "unavailable"
        if slot.link is not None:
            self.send(slot, [(Kind.PROXY_ANSWER, token, result)])

    async def close(self) -> None:
        """Close what main opened for its workers (the application's HTTP session)."""
        if self.proxy is not None:
            await self.proxy.close()

    def gone(self, slot: Slot) -> None:
        """A worker exited: every stream it had not reported ended did end with it, and
        its holds go."""
        node = self._node()
        assert node.reporter is not None
        for (channel, session), (meta, presence) in slot.sessions.items():
            node.reporter.leave(channel, session, meta, "worker_exit", presence)
        slot.sessions.clear()
        node.hub.release(list(slot.held.values()))
        slot.held.clear()
        for token in list(slot.users):
            self._user_release(slot, token)
