"""Stream channels on Redis Cluster: each stream read on the master that owns its slot.

A stream key lives on the master owning its slot (CRC16 of the key, or of its ``{hash
tag}``). Redis refuses multi-key commands across slots (``CROSSSLOT``), also when the
slots are on the same master, so one blocking ``XREAD`` covers the streams of one slot:
the cluster reader keeps one ``StreamReader`` per slot in use, connected to that slot's
master, and all streams of the slot share its ``XREAD``. Streams sharing a hash tag
(``{orders}:7``, ``{orders}:8``) share a slot, hence one reader; untagged keys usually get
one each.

Following the cluster as ``ClusterBroker`` does: the slot map (``CLUSTER SLOTS``) is
read again whenever a reader's session ends (master killed, connection cut, ``MOVED``
after a slot moved, a demoted master's error) — at once, then with the capped, jittered
backoff until every stream is placed on a master. A slot whose master changed gets a new
reader on the new master, which goes on from each stream's last delivered entry (the
old reader's positions, handed over): entries the promoted replica has are delivered
once, none twice, and no gap is signalled (nothing was lost — entries the old master
had not replicated are lost with it, Redis's own guarantee; publishers that need more
use ``WAIT``).

State, as the hub sees it (``ready``): UP once the slot map is known, every stream is
placed and every reader is reading; DOWN when a reader's session ends or a stream's slot
has no master, UP again once all read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from redis.crc import key_slot

from ..config import RedisConfig
from ..core.waiters import Waiters
from ..logs import fields
from .cluster import SlotMap, SlotMapWatcher
from .discovery import Address, node_url, show
from .source import BrokerState, Source
from .streams import Entry, StreamReader, StreamReplays

__all__ = ["ClusterStreamReader"]

log = logging.getLogger(__name__)


class _SlotReader(StreamReader):
    """The reader of one slot's streams, on the master that owns the slot."""

    def __init__(self, cluster: ClusterStreamReader, slot: int, addr: Address) -> None:
        config = dataclasses.replace(
            cluster.config, url=node_url(cluster.config, addr), cluster=False
        )
        super().__init__(
            config,
            lambda key, entries: cluster._entries(self, key, entries),
            lambda key, entries: cluster._started(self, key, entries),
            cluster._prefill,
            lambda old, new: cluster._reader_state(self, new),
            cluster._maxlen,
            on_failed=lambda key, reason: cluster._failed(self, key, reason),
            replays=cluster.replays,  # one pool (and bound) for the whole process
        )
        self.cluster = cluster
        self.slot = slot
        self.addr = addr
        self.task: asyncio.Task[None] | None = None

    async def _session(self) -> None:
        try:
            await super()._session()
        finally:
            self.cluster._session_ended(self)


class ClusterStreamReader(Source):
    """``StreamReader``'s interface over one ``StreamReader`` per slot in use."""

    log = log
    up_line = "redis cluster streams reading"
    down_line = "redis cluster streams down"
    unavailable_line = "redis cluster streams unavailable, retrying"

    def __init__(
        self,
        config: RedisConfig,
        on_entries: Callable[[bytes, list[Entry]], None],
        on_start: Callable[[bytes, list[Entry]], None],
        prefill: Callable[[bytes], int],
        on_state: Callable[[BrokerState, BrokerState], None] | None = None,
        maxlen: Callable[[bytes], int] = lambda key: 0,
        *,
        on_failed: Callable[[bytes, str], None] | None = None,
    ) -> None:
        super().__init__(config, on_state)
        self._on_failed = on_failed
        self._on_entries = on_entries
        self._on_start = on_start
        self._prefill = prefill
        self._maxlen = maxlen
        self._watcher = SlotMapWatcher(self, config.seeds(), self._refreshed)
        self._wanted: set[bytes] = set()
        self._readers: dict[int, _SlotReader] = {}  # slot -> its reader
        # Wanted streams no reader has: the slot map is not known yet, or their slot
        # has no master now; with the position to go on from (None: not started yet).
        self._unplaced: dict[bytes, bytes | None] = {}
        self._waiters = Waiters()
        # Replay reads: one pool; redis-py's cluster client reads each key on its master.
        self.replays = StreamReplays(config)

    # --- what the hub asks for ------------------------------------------------------

    @property
    def wanted(self) -> set[bytes]:
        return set(self._wanted)

    @property
    def positions(self) -> dict[bytes, bytes]:
        """Every stream being read, with the id of the last entry delivered."""
        out: dict[bytes, bytes] = {}
        for reader in self._readers.values():
            out.update(reader.positions)
        out.update({k: p for k, p in self._unplaced.items() if p is not None})
        return out

    @property
    def _slots(self) -> SlotMap:
        return self._watcher.slots

    def up_fields(self) -> dict[str, Any]:
        return {"streams": len(self._wanted), "readers": len(self._readers)}

    def want(self, keys: Iterable[bytes]) -> None:
        """Start reading ``keys`` (from their current end) on the masters owning them."""
        new = [k for k in keys if k not in self._wanted]
        if not new:
            return
        self._wanted.update(new)
        self._unplaced.update(dict.fromkeys(new))
        if self._slots:
            self._place()
        else:
            self._watcher.refresh_soon()  # the first slot map places them

    def drop(self, keys: Iterable[bytes]) -> None:
        """Stop reading ``keys``; a reader left without streams is closed."""
        emptied = set()
        for k in keys:
            if k not in self._wanted:
                continue
            self._wanted.discard(k)
            self._unplaced.pop(k, None)
            reader = self._readers.get(key_slot(k))
            if reader is not None:
                reader.drop((k,))
                if not reader.wanted:
                    emptied.add(reader)
            self._waiters.forget(k)
        for reader in emptied:
            self._close(reader)
        self._maybe_up()

    def set_streams(self, keys: Iterable[bytes]) -> None:
        """Read exactly ``keys`` from now on (config reload)."""
        new = set(keys)
        self.drop(self._wanted - new)
        self.want(new - self._wanted)

    def live(self, key: bytes) -> bool:
        """True once the reader knows where ``key`` starts: its events will all arrive."""
        reader = self._readers.get(key_slot(key))
        if reader is not None and reader.live(key):
            return True
        return self._unplaced.get(key) is not None

    async def wait_live(self, keys: Iterable[bytes], timeout: float) -> bool:
        """True once every one of ``keys`` is live; False after ``timeout``."""
        return await self._waiters.wait(keys, self.live, timeout)

    async def read_range(self, key: bytes, after: bytes, until: bytes, count: int) -> list[Entry]:
        """``XRANGE`` on the master owning ``key`` (see ``StreamReplays.read_range``)."""
        return await self.replays.read_range(key, after, until, count)

    async def first_id(self, key: bytes) -> bytes | None:
        """The id of the oldest entry ``key`` still has, asked of its master."""
        return await self.replays.first_id(key)

    # --- what the readers report --------------------------------------------------------

    def _current(self, reader: _SlotReader) -> bool:
        return self._readers.get(reader.slot) is reader

    def _entries(self, reader: _SlotReader, key: bytes, entries: list[Entry]) -> None:
        if self._current(reader):  # a reader closed on a move delivers nothing more
            self._on_entries(key, entries)

    def _started(self, reader: _SlotReader, key: bytes, entries: list[Entry]) -> None:
        if not self._current(reader):
            return
        self._on_start(key, entries)
        self._waiters.wake(key)

    def _failed(self, reader: _SlotReader, key: bytes, reason: str) -> None:
        if not self._current(reader):
            return
        self.drop((key,))  # (its reader has let it go already; closed if it was the last)
        if self._on_failed is not None:
            self._on_failed(key, reason)  # (called from the slot reader's guard)

    def _reader_state(self, reader: _SlotReader, new: BrokerState) -> None:
        if not self._current(reader):
            return
        if new is BrokerState.DOWN:
            self.fault(f"stream reader on {show(reader.addr)} down")
        self._maybe_up()

    def _session_ended(self, reader: _SlotReader) -> None:
        if not self._current(reader):
            return  # closed on purpose
        # The master may be gone, or no longer own the slot: read the slot map again.
        self.fault(f"stream reader on {show(reader.addr)} lost its connection")
        self._watcher.refresh_soon()

    def _maybe_up(self) -> None:
        """UP once every stream is placed and every slot reader reads."""
        if (
            self._slots
            and not self._unplaced
            and all(r.state is BrokerState.UP for r in self._readers.values())
        ):
            self.mark_up()

    # --- placing streams on the masters ---------------------------------------------

    def _reader(self, slot: int, addr: Address) -> _SlotReader:
        reader = self._readers.get(slot)
        if reader is None:
            reader = self._readers[slot] = _SlotReader(self, slot, addr)
            reader.task = self._watcher.parts.spawn(
                reader.run(), f"ssehub-streams-{show(addr)}-{slot}"
            )
        return reader

    def _close(self, reader: _SlotReader) -> None:
        if self._readers.get(reader.slot) is reader:
            del self._readers[reader.slot]
        if reader.task is not None:
            self._watcher.parts.close(reader.task)

    def _place(self) -> None:
        """Put every stream on the reader of its slot's current master; a slot that moved
        gets a new reader, which goes on from the old one's positions."""
        if not self._slots:
            return  # the first slot map places everything wanted
        moving = self._unplaced
        self._unplaced = {}
        for slot, reader in list(self._readers.items()):
            addr = self._slots[slot]
            if addr == reader.addr:
                continue
            # Synchronous from here to resume(): the old reader delivers nothing more
            # (it is cancelled, and _current() turns away anything late).
            moving.update(reader.handover())
            self._close(reader)
            log.info(
                "redis cluster streams moved",
                extra=fields(slot=slot, old=show(reader.addr), new=show(addr) if addr else ""),
            )
        starts: dict[_SlotReader, list[bytes]] = {}
        resumes: dict[_SlotReader, dict[bytes, bytes]] = {}
        for key, position in moving.items():
            slot = key_slot(key)
            addr = self._slots[slot]
            if addr is None:
                self._unplaced[key] = position
                continue
            reader = self._reader(slot, addr)
            if position is None:
                starts.setdefault(reader, []).append(key)
            else:
                resumes.setdefault(reader, {})[key] = position
        for reader, keys in starts.items():
            reader.want(keys)
        for reader, positions in resumes.items():
            reader.resume(positions)

    # --- following the slot map -------------------------------------------------------

    def _refreshed(self) -> None:
        self._place()
        if self._unplaced:
            self.fault(f"{len(self._unplaced)} streams in slots without a master")
        self._maybe_up()

    async def run(self) -> None:
        """Read the slot map, keep the readers, follow every change; cancel to stop.
        Nothing until a stream is wanted: hubs without stream channels never ask."""
        try:
            await self._watcher.run(lambda: bool(self._wanted))
        finally:
            await self.replays.aclose()
