"""Subscribe/unsubscribe events and presence in Redis: the node's writer and the reader.

**Writes** (``EventsWriter``, in the process that owns the node's Redis side: the single
process, or the main process with workers): every join and leave the hub's roster
reports is queued; one writer task sends what is queued and whatever arrived meanwhile
next, so a connect storm costs a round trip or two per batch, never per browser, and
nothing on the delivery path waits for it. What fails (Redis away) is kept and sent
again after a capped, jittered backoff; events beyond ``_MAX_QUEUED`` are dropped,
oldest first, and counted.

**Each event is published once.** Events go out in batches of up to ``_BATCH_EVENTS``,
each batch one script run (``EVAL``: atomic on every topology; on Cluster it runs on the
master owning the node's batch key, and classic ``PUBLISH`` reaches every node) that
also records the batch's number under ``ssehub:node:<node>:batch``. When a batch's
answer is lost (the connection cut after Redis ran it), the writer reads that number
before sending again and skips the batch if Redis ran it. So a retry never publishes
twice -- unless Redis itself loses that write (a restart without persistence, or a
failover before the replica had it) in the instant after running the batch: then the
batch may be published again (at least once). Presence writes (``HSET``/``HDEL`` of
this node's own fields and counts, the liveness ``SET``) are idempotent: they go in a
pipeline of their own, and are simply sent again; after any failed write, the next
refresh writes all the node's entries again, in case Redis lost them meanwhile.

**Presence layout**, per channel (a family's member has its own):

- ``ssehub:presence:{<channel>}`` -- a hash, field ``<node>:<session>`` -> meta JSON;
- ``ssehub:presence:{<channel>}:count`` -- a hash, field ``<node>`` -> that node's
  entries (so the count is exact without scanning the members);
- ``ssehub:node:<node>`` -- the node's liveness key, set with a TTL of
  ``presence.ttl`` and refreshed every third of it.

A node id is random per start, so a node that replaces a killed one owns none of its
entries. Readers count and list only entries whose node key exists and delete the rest
as they meet them: a node killed with SIGKILL vanishes from every answer within
``presence.ttl``. A live node whose key was lost (Redis restarted, or away longer than
the TTL) writes all its entries again when its next refresh finds the key missing. The
braces are Redis Cluster hash tags: a channel's two keys share a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from ..config import Config, RedisConfig
from ..logs import fields
from ..tasks import Tasks
from .clients import FAULTS, Client, close, command_client
from .source import Backoff

__all__ = ["EventsWriter", "PresenceReader", "batch_key", "count_key", "dumps", "key", "node_key"]

log = logging.getLogger(__name__)

# Events kept while Redis is away, at most; older ones are dropped (and counted).
_MAX_QUEUED = 100_000
# Events per script run (each is one atomic batch).
_BATCH_EVENTS = 1000
# How long Redis keeps the number of the last batch it ran (ms): longer than any retry.
_MARKER_TTL_MS = 3_600_000

# One batch of events: record its number, then publish each (target, message) pair.
_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return (#ARGV - 2) / 2
"""


def key(channel: str) -> str:
    """The hash of ``channel``'s members: ``<node>:<session>`` -> meta JSON."""
    return f"ssehub:presence:{{{channel}}}"


def count_key(channel: str) -> str:
    """The hash of ``channel``'s member count per node."""
    return f"ssehub:presence:{{{channel}}}:count"


def node_key(node: str) -> str:
    """A node's liveness key (exists while the node refreshes it)."""
    return f"ssehub:node:{node}"


def batch_key(node: str) -> str:
    """The number of the last batch of events Redis ran for ``node``."""
    return f"ssehub:node:{node}:batch"


def _client(config: RedisConfig) -> Client:
    return command_client(
        config, socket_timeout=config.health_check_timeout + config.connect_timeout
    )


def dumps(value: Any) -> str:
    """Compact JSON, as events and presence entries are written."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class EventsWriter:
    """The node's writer of events and presence entries: ``join``/``leave`` queue, a task writes."""

    def __init__(self, config: Config, node: str) -> None:
        self.config = config
        self.node = node  # random per start: see the module's docstring
        self._events: list[tuple[str, str]] = []  # (Redis channel, message), in order
        # The batch being sent (taken from the front of _events) and its number; and
        # whether Redis may have run it (its answer was lost): check before resending.
        self._batch: list[tuple[str, str]] = []
        self._batch_no = 0
        self._unsure = False
        # A presence write failed: Redis may have lost entries; write all at next refresh.
        self._suspect = False
        # This node's presence entries (channel -> session -> meta JSON), and what
        # changed since the last write.
        self._mine: dict[str, dict[str, str]] = {}
        self._added: dict[str, dict[str, str]] = {}
        self._removed: dict[str, set[str]] = {}
        self._wake = asyncio.Event()
        self._announced = False  # the node key was set once (a missing one means lost)
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.published = 0  # events sent
        self.dropped = 0  # events dropped while Redis was away
        self.batches = 0  # batches of events published

    # --- queueing (synchronous, from the hub's roster) ----------------------------

    def join(self, channel: str, session: str, meta: Any, presence: bool) -> None:
        """A stream of ``channel`` registered."""
        self._event("subscribe", channel, session, meta, None)
        if presence:
            value = dumps(meta)
            self._mine.setdefault(channel, {})[session] = value
            self._added.setdefault(channel, {})[session] = value
        self._wake.set()

    def leave(self, channel: str, session: str, meta: Any, reason: str, presence: bool) -> None:
        """A stream of ``channel`` ended, for ``reason``."""
        self._event("unsubscribe", channel, session, meta, reason)
        # Whether it has an entry is what counts (a reload may have changed the flag).
        mine = self._mine.get(channel)
        if mine is not None and mine.pop(session, None) is not None:
            if not mine:
                del self._mine[channel]
            added = self._added.get(channel)
            if added is None or added.pop(session, None) is None:
                self._removed.setdefault(channel, set()).add(session)
        self._wake.set()

    def _event(self, kind: str, channel: str, session: str, meta: Any, reason: str | None) -> None:
        config = self.config
        if not config.events.enabled:
            return
        if config.juggernaut.enabled:
            # Juggernaut's own channels and field names: its roster scripts read them.
            target = f"{config.juggernaut.redis_channel}:{kind}"
            message: dict[str, Any] = {"channel": channel, "meta": meta, "session_id": session}
        else:
            target = config.events.redis_channel
            message = {"type": kind, "channel": channel, "session_id": session, "meta": meta}
            message["node"] = self.node
            if reason is not None:
                message["reason"] = reason
        self._events.append((target, dumps(message)))
        if len(self._events) > _MAX_QUEUED:
            drop = len(self._events) - _MAX_QUEUED
            del self._events[:drop]
            self.dropped += drop

    # --- writing ------------------------------------------------------------------

    def start(self, tasks: Tasks) -> None:
        """Start the writer task, owned by the process's ``tasks``."""
        self._task = tasks.spawn(self._run(), "ssehub-events-writer")

    def _pending(self) -> bool:
        return bool(self._batch or self._events or self._added or self._removed)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        ttl = self.config.presence.ttl
        next_refresh = 0.0
        backoff = Backoff(self.config.redis)
        while not (self._closing and not self._pending()):
            live = bool(self._mine) or self._announced
            if not self._pending() and not self._closing:
                timeout = max(next_refresh - loop.time(), 0.0) if live else None
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the
                # cancellation that close() sends.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            self._wake.clear()
            live = bool(self._mine) or self._announced
            refresh = live and (loop.time() >= next_refresh or self._suspect)
            try:
                await self._write(refresh)
            except FAULTS as exc:
                delay = backoff.next()
                log.warning(
                    "events and presence not written, retrying",
                    extra=fields(error=str(exc) or type(exc).__name__, retry_in=round(delay, 2)),
                )
                await backoff.wait(delay=delay)
                continue
            backoff.reset()
            if refresh:
                next_refresh = loop.time() + ttl / 3

    def _redis(self) -> Client:
        if self._client is None:
            self._client = _client(self.config.redis)
        return self._client

    async def _write(self, refresh: bool) -> None:
        """The queued events (never twice), then the presence changes and the refresh."""
        if not refresh and not self._pending():
            return
        await self._publish()
        await self._write_presence(refresh)

    async def _publish(self) -> None:
        """Publish every queued event, a batch per script run; a batch Redis ran is
        never sent again (see the module's docstring)."""
        client = self._redis()
        marker = batch_key(self.node)
        while self._batch or self._events:
            if not self._batch:
                self._batch = self._events[:_BATCH_EVENTS]
                del self._events[: len(self._batch)]
                self._batch_no += 1
            elif self._unsure:
                # The last try's answer was lost: did Redis run it?
                ran = await client.get(marker) == str(self._batch_no).encode()
                self._unsure = False
                if ran:
                    self._sent()
                    continue
            args = [a for pair in self._batch for a in pair]
            self._unsure = True  # from here, Redis may run it whatever we hear back
            await client.eval(_PUBLISH, 1, marker, str(self._batch_no), str(_MARKER_TTL_MS), *args)
            self._sent()

    def _sent(self) -> None:
        self.published += len(self._batch)
        self.batches += 1
        self._batch = []
        self._unsure = False

    async def _write_presence(self, refresh: bool) -> None:
        """One pipeline: the liveness refresh and every presence change (idempotent)."""
        if not refresh and not (self._added or self._removed):
            return
        added, self._added = self._added, {}
        removed, self._removed = self._removed, {}
        pipe = self._redis().pipeline(transaction=False)
        if refresh:
            # SET ... GET: the old value tells whether the key was lost meanwhile.
            pipe.set(node_key(self.node), "1", px=int(self.config.presence.ttl * 1000), get=True)
        for channel in added.keys() | removed.keys():
            self._changes(pipe, channel, added.get(channel), removed.get(channel))
        try:
            results = await pipe.execute()
        except BaseException:
            self._restore(added, removed)
            self._suspect = True
            raise
        if refresh:
            if (results[0] is None and self._announced) or self._suspect:
                if results[0] is None:
                    log.warning("presence entries lost in Redis; writing them again")
                await self._rewrite()
            self._announced = True
            self._suspect = False

    def _changes(
        self,
        pipe: Any,
        channel: str,
        added: dict[str, str] | None,
        removed: set[str] | None,
    ) -> None:
        node = self.node
        if added:
            pipe.hset(key(channel), mapping={f"{node}:{s}": m for s, m in added.items()})
        if removed:
            pipe.hdel(key(channel), *(f"{node}:{s}" for s in removed))
        n = len(self._mine.get(channel, ()))
        if n:
            pipe.hset(count_key(channel), node, n)
        else:
            pipe.hdel(count_key(channel), node)

    async def _rewrite(self) -> None:
        pipe = self._redis().pipeline(transaction=False)
        for channel, mine in self._mine.items():
            self._changes(pipe, channel, mine, None)
        await pipe.execute()

    def _restore(self, added: dict[str, dict[str, str]], removed: dict[str, set[str]]) -> None:
        """Put presence changes that were not written back, under what came since."""
        # A session joins once and leaves once: what came since wins over the batch.
        for channel, sessions in added.items():
            now_added = self._added.setdefault(channel, {})
            now_removed = self._removed.get(channel, set())
            for session, meta in sessions.items():
                if session not in now_removed and session in self._mine.get(channel, {}):
                    now_added.setdefault(session, meta)
        for channel, gone in removed.items():
            now_added = self._added.get(channel, {})
            self._removed.setdefault(channel, set()).update(s for s in gone if s not in now_added)
        self._wake.set()

    async def close(self, timeout: float) -> None:
        """Write what is queued (the shutdown's unsubscribes), drop the liveness key.

        The writer finishes on its own rather than being cancelled: a batch cut off
        after Redis ran it would be sent again.
        """
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                if self._task is not None:
                    await self._task
                else:
                    await self._write(False)
                if self._announced:
                    await self._redis().delete(node_key(self.node))
                if self._batch_no:
                    await self._redis().delete(batch_key(self.node))
        except (TimeoutError, *FAULTS) as exc:
            lost = len(self._batch) + len(self._events)
            log.warning("events not written at shutdown", extra=fields(events=lost, error=str(exc)))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await close(self._client)
            self._client = None


class PresenceReader:
    """Answers presence queries from Redis (its own connection, opened on first use)."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self._client: Client | None = None

    async def page(self, channel: str, cursor: int, count: int) -> dict[str, Any]:
        """The count of ``channel``'s members and one page of them, from ``cursor``.

        Entries of nodes whose liveness key is gone are left out, and deleted.
        """
        if self._client is None:
            self._client = _client(self.config)
        client = self._client
        pipe = client.pipeline(transaction=False)
        pipe.hscan(key(channel), cursor, count=count)
        pipe.hgetall(count_key(channel))
        (next_cursor, entries), counts = await pipe.execute()
        page: list[tuple[str, str, bytes]] = []
        for field, meta in entries.items():
            node, _, session = field.decode().partition(":")
            page.append((node, session, meta))
        per_node = {n.decode(): int(v) for n, v in counts.items()}
        nodes = sorted({n for n, _, _ in page} | per_node.keys())
        pipe = client.pipeline(transaction=False)
        for node in nodes:
            pipe.exists(node_key(node))
        alive = {n for n, found in zip(nodes, await pipe.execute(), strict=True) if found}
        dead_fields = [f"{n}:{s}" for n, s, _ in page if n not in alive]
        dead_nodes = [n for n in per_node if n not in alive]
        if dead_fields or dead_nodes:
            pipe = client.pipeline(transaction=False)
            if dead_fields:
                pipe.hdel(key(channel), *dead_fields)
            if dead_nodes:
                pipe.hdel(count_key(channel), *dead_nodes)
            await pipe.execute()
        return {
            "channel": channel,
            "count": sum(v for n, v in per_node.items() if n in alive),
            "members": [
                {"session_id": s, "node": n, "meta": json.loads(m, parse_constant=str)}
                for n, s, m in page
                if n in alive
            ],
            "cursor": str(next_cursor),
        }

    async def close(self) -> None:
        if self._client is not None:
            await close(self._client)
            self._client = None
