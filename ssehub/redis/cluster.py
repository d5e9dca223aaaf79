"""Redis Cluster: sharded pub/sub over one connection per master, following the slot map.

A sharded channel (``SSUBSCRIBE``; publishers ``SPUBLISH``) lives on the master that owns
its key slot (CRC16 of the name, or of its ``{hash tag}``). The cluster broker reads the
slot map (``CLUSTER SLOTS``, from any node it knows) and keeps one ``_Node`` per master:
a ``Broker`` of its own (same hiredis protocol, same batching, same reconnect and health
checks) speaking ``SSUBSCRIBE``/``SUNSUBSCRIBE``, one command per slot since Redis
refuses sharded commands across slots. Channels that say ``sharded: false`` (and the
Juggernaut channel) use classic ``SUBSCRIBE`` over one more node connection, to any
master: classic messages reach every node of a cluster.

Following the cluster (``SlotMapWatcher``, the one slot-map follower of both cluster
sources, this broker and the stream reader of cluster_streams.py): a node whose session
ends (master killed, connection cut), and a channel Redis unsubscribes by itself
(``sunsubscribe`` when its slot moved or its master was demoted), make the broker read
the slot map again — at once, then with the usual capped, jittered backoff until every
channel is placed — and move channels to the master that now owns them. Nodes that are
no longer masters are closed. A node's task that ends on its own (a Redis too old, a
bug) ends the broker's ``run()`` with what it raised: never a node silently gone.

State, as the hub sees it: UP once the slot map is known and every channel placed is
confirmed by its owner; DOWN when a node that was up goes down or a channel is lost, UP
again once all are back. The gap signal is per process, so a failover of one shard
tells the streams of every channel (``redis_outage``): more than needed, never less.
Stream channels have readers of their own, placed by the same slot map: see
cluster_streams.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import groupby
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from ..config import RedisConfig
from ..logs import fields
from .discovery import Address, QueryError, node_url, query, show
from .pubsub import Broker, _PubSubProtocol
from .source import BrokerState, Parts, SessionEnded, Source

__all__ = ["ClusterBroker", "SlotMap", "SlotMapWatcher", "read_slot_map", "slot_map"]

log = logging.getLogger(__name__)

SlotMap = list[Address | None]  # slot -> its master, None where no master serves it


def slot_map(reply: Any, asked: Address) -> tuple[SlotMap, list[Address]]:
    """``CLUSTER SLOTS`` to (slot -> master, every node named); ``asked`` fills blank hosts."""
    slots: SlotMap = [None] * REDIS_CLUSTER_HASH_SLOTS
    nodes: list[Address] = []
    for start, end, *members in reply:
        addrs = [(m[0].decode() or asked[0], int(m[1])) for m in members]
        slots[start : end + 1] = [addrs[0]] * (end + 1 - start)
        nodes.extend(a for a in addrs if a not in nodes)
    return slots, nodes


async def read_slot_map(
    config: RedisConfig, known: Iterable[Address]
) -> tuple[SlotMap, list[Address]]:
    """The slot map from the first of ``known`` that has one; ``SessionEnded`` if none."""
    errors = []
    for addr in list(known):
        try:
            reply = await query(config, addr, "CLUSTER", "SLOTS")
        except QueryError as exc:
            errors.append(str(exc))
            continue
        slots, nodes = slot_map(reply, addr)
        if any(slots):
            return slots, nodes
        errors.append(f"{show(addr)}: no slots assigned")
    raise SessionEnded("no cluster node gave the slot map: " + "; ".join(errors))


class SlotMapWatcher:
    """Follows a cluster's slot map for one cluster source (pub/sub or streams), and owns
    the source's parts (a connection per master, a reader per slot).

    It reads ``CLUSTER SLOTS`` from a node it knows (the seeds, then every node named),
    hands the map to the source's ``place`` (which puts each channel or stream on the
    master owning it now, and calls ``mark_up()`` once all is placed and every part is
    up), and reads it again whenever told (``refresh_soon``: a part's session ended, a
    channel moved), at once, then with the source's backoff until the source is UP.
    A part that ends on its own ends ``run()`` with what it raised.
    """

    def __init__(self, source: Source, seeds: list[Address], place: Callable[[], None]) -> None:
        self.source = source
        self.config = source.config
        self.seeds = seeds
        self.known: list[Address] = list(self.seeds)  # nodes to ask for the slot map
        self.slots: SlotMap = []
        self.wake = asyncio.Event()
        self.parts = Parts(self.wake)
        self._place = place

    def refresh_soon(self) -> None:
        """Read the slot map again now."""
        self.wake.set()

    async def run(self, wanted: Callable[[], bool] = lambda: True) -> None:
        """Follow the slot map until cancelled (nothing while not ``wanted()``)."""
        source = self.source
        try:
            while True:
                while not wanted():
                    self.wake.clear()
                    await self.wake.wait()
                    self.parts.check()
                self.wake.clear()
                try:
                    slots, nodes = await read_slot_map(self.config, self.known)
                except SessionEnded as exc:
                    source.fault(str(exc))
                else:
                    self.slots = slots
                    self.known = [*nodes, *(s for s in self.seeds if s not in nodes)]
                    self._place()
                self.parts.check()
                if source.ready:
                    await self.wake.wait()
                else:
                    await source.backoff(self.wake)
                self.parts.check()
        finally:
            await self.parts.aclose()


class _Node(Broker):
    """One subscription connection to one cluster node, with its own reconnect loop."""

    def __init__(self, cluster: ClusterBroker, addr: Address, sharded: bool) -> None:
        config = dataclasses.replace(
            cluster.config, url=node_url(cluster.config, addr), cluster=False
        )
        super().__init__(config, (), cluster._on_message, self._state_changed)
        self.cluster = cluster
        self.addr = addr
        self.sharded = sharded
        if sharded:
            self.subscribe_command = "SSUBSCRIBE"
            self.unsubscribe_command = "SUNSUBSCRIBE"
        self.task: asyncio.Task[None] | None = None

    def _state_changed(self, old: BrokerState, new: BrokerState) -> None:
        self.cluster._node_state(self, old, new)

    def _send(self, proto: _PubSubProtocol, command: str, channels: list[bytes]) -> None:
        if not self.sharded:
            super()._send(proto, command, channels)
            return
        # Sharded commands must stay within one slot (CROSSSLOT otherwise): a command
        # per slot, all written at once, so still one round trip.
        for _, group in groupby(sorted((key_slot(c), c) for c in channels), lambda p: p[0]):
            super()._send(proto, command, [c for _, c in group])

    def _on_ack(self, kind: bytes, channel: bytes) -> None:
        # An unsubscribe nobody asked for: Redis let the channel go (slot moved).
        asked = self._unconfirmed[channel]
        forced = kind == b"unsubscribe" and channel in self.wanted and not asked
        super()._on_ack(kind, channel)
        if forced:
            self.wanted.discard(channel)
            self.cluster._lost(self, channel)
        elif channel in self.subscribed:
            self.cluster._confirmed(self, channel)

    async def _session(self) -> None:
        try:
            await super()._session()
        finally:
            self.cluster._session_ended(self)


class ClusterBroker(Broker):
    """The broker for a Redis Cluster: the hub's interface over one ``_Node`` per master."""

    def __init__(
        self,
        config: RedisConfig,
        channels: Iterable[str | bytes],
        on_message: Callable[[bytes, bytes], None],
        on_state: Callable[[BrokerState, BrokerState], None] | None = None,
        sharded: Callable[[bytes], bool] | None = None,
    ) -> None:
        # A Broker of one node's URL (the first seed's: its credentials and TLS serve
        # for every node), which never connects itself: its nodes do.
        seeds = config.seeds()
        seed = dataclasses.replace(config, url=node_url(config, seeds[0]))
        super().__init__(seed, channels, on_message, on_state)
        self.seeds = seeds
        self._sharded = sharded or (lambda channel: True)
        self._watcher = SlotMapWatcher(self, seeds, self._refreshed)
        self._classic: Address | None = None  # the node for classic SUBSCRIBE
        self._nodes: dict[tuple[Address, bool], _Node] = {}
        self._route: dict[bytes, _Node] = {}  # channel -> the node it is placed on
        self._pending: set[bytes] = set()  # placed, not confirmed yet
        self._unplaced: set[bytes] = set()  # wanted, but no master serves its slot

    @property
    def _slots(self) -> SlotMap:
        return self._watcher.slots

    def _safe_url(self) -> str:
        more = f"+{len(self.seeds) - 1}" if len(self.seeds) > 1 else ""
        return f"cluster:{show(self.seeds[0])}{more}"

    # --- the hub's changes, batched by Broker.want/drop -----------------------------

    def _kept(self, channel: bytes) -> None:
        # Its node was never told of the drop: subscribed there means subscribed here.
        node = self._route.get(channel)
        if node is not None and channel in node.subscribed:
            self._confirmed(node, channel)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._last_flush = asyncio.get_running_loop().time()
        add, self._add = self._add, set()
        remove, self._remove = self._remove, set()
        gone: dict[_Node, list[bytes]] = defaultdict(list)
        for c in remove:
            self._pending.discard(c)
            self._unplaced.discard(c)
            node = self._route.pop(c, None)
            if node is not None:
                gone[node].append(c)
        for node, channels in gone.items():
            node.drop(channels)
        if self._slots:  # else the first slot map places everything wanted
            self._place(add)

    def _owner(self, channel: bytes) -> _Node | None:
        if self._sharded(channel):
            addr = self._slots[key_slot(channel)]
            return None if addr is None else self._node(addr, True)
        return None if self._classic is None else self._node(self._classic, False)

    def _node(self, addr: Address, sharded: bool) -> _Node:
        node = self._nodes.get((addr, sharded))
        if node is None:
            node = self._nodes[(addr, sharded)] = _Node(self, addr, sharded)
            node.task = self._watcher.parts.spawn(node.run(), f"ssehub-redis-{show(addr)}")
        return node

    def _place(self, channels: Iterable[bytes]) -> None:
        """Put each channel on the node that owns it now, moving it if it was elsewhere."""
        moves_from: dict[_Node, list[bytes]] = defaultdict(list)
        moves_to: dict[_Node, list[bytes]] = defaultdict(list)
        for c in channels:
            node = self._owner(c)
            current = self._route.get(c)
            if node is current:
                continue
            self.subscribed.discard(c)
            if current is not None:
                moves_from[current].append(c)
            if node is None:
                del self._route[c]
                self._pending.discard(c)
                self._unplaced.add(c)
                continue
            self._unplaced.discard(c)
            self._route[c] = node
            self._pending.add(c)
            moves_to[node].append(c)
        for node, moved in moves_from.items():
            node.drop(moved)
        for node, moved in moves_to.items():
            node.want(moved)

    # --- what the nodes report ----------------------------------------------------------

    def _confirmed(self, node: _Node, channel: bytes) -> None:
        if self._route.get(channel) is not node:
            return
        self.subscribed.add(channel)
        self._pending.discard(channel)
        self._waiters.wake(channel)
        self._maybe_up()

    def _lost(self, node: _Node, channel: bytes) -> None:
        if self._route.get(channel) is not node:
            return
        del self._route[channel]
        self.subscribed.discard(channel)
        self._pending.discard(channel)
        self._unplaced.add(channel)
        log.info(
            "redis cluster channel moved",
            extra=fields(node=show(node.addr), channel=channel.decode("utf-8", "replace")),
        )
        self.fault(f"channel {channel!r} left {show(node.addr)}")
        self._watcher.refresh_soon()

    def _node_state(self, node: _Node, old: BrokerState, new: BrokerState) -> None:
        if new is BrokerState.DOWN:
            self.fault(f"node {show(node.addr)} down")
        self._maybe_up()

    def _session_ended(self, node: _Node) -> None:
        if self._nodes.get((node.addr, node.sharded)) is not node:
            return  # closed on purpose
        for c in node.wanted:
            if self._route.get(c) is node:
                self.subscribed.discard(c)
                self._pending.add(c)
        self._watcher.refresh_soon()

    def _maybe_up(self) -> None:
        """UP once every channel is placed and confirmed, and every node is up."""
        if (
            self._slots
            and not self._pending
            and not self._unplaced
            and all(n.state is BrokerState.UP for n in self._nodes.values())
        ):
            self.mark_up()

    # --- following the slot map -------------------------------------------------------

    def _refreshed(self) -> None:
        """A new slot map: one node per master, every channel on its owner."""
        masters = {a for a in self._slots if a is not None}
        if self._classic not in masters:
            self._classic = min(masters)
        for (addr, sharded), node in list(self._nodes.items()):
            if addr not in masters or (not sharded and addr != self._classic):
                self._close(node)
        for addr in sorted(masters):
            self._node(addr, True)  # one connection per master, channels or not
        self._place(self.wanted)
        if self._unplaced:
            self.fault(f"{len(self._unplaced)} channels in slots without a master")
        self._maybe_up()

    def _close(self, node: _Node) -> None:
        """Stop a node that is no longer a master (or no longer the classic one)."""
        log.info("redis cluster node closed", extra=fields(node=show(node.addr)))
        del self._nodes[(node.addr, node.sharded)]
        for c in node.wanted:
            if self._route.get(c) is node:
                del self._route[c]
                self.subscribed.discard(c)
                self._pending.discard(c)
        if node.task is not None:
            self._watcher.parts.close(node.task)

    async def run(self) -> None:
        """Read the slot map, keep the nodes, follow every change; cancel to stop."""
        await self._watcher.run()
