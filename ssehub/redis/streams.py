"""The Redis Streams side: one blocking reader for every stream channel of the process.

A stream channel's events are the entries of a Redis Stream (``XADD orders * data …``),
and its SSE ids are the entry ids: the same on every hub node and after every restart,
so a client resumes exactly wherever it reconnects.

One connection blocks in ``XREAD COUNT … BLOCK … STREAMS k1 k2 … id1 id2 …`` over every
stream the hub follows, and hands each batch to the hub synchronously. It continues
from the last entry it delivered per stream, across reconnects: entries added while
Redis (or the hub's connection) was away are delivered afterwards, none lost, none
doubled. A second, ordinary connection does the rest: reading where a new stream
starts (``XREVRANGE``, which also fills the hub's cache of recent entries), paging
through ``XRANGE`` for clients that resume from further back than the cache, trimming,
and ``CLIENT UNBLOCK`` to wake the reader when the set of streams changes.
"""

from __future__ import annotations

import asyncio
import logging
import typing
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import RedisConfig
from ..core.waiters import Waiters
from ..logs import fields
from .clients import Client, close, command_client, master_moved
from .source import Backoff, BrokerState, SessionEnded, Source

__all__ = ["Entry", "StreamReader", "StreamReplays", "StreamSource"]

log = logging.getLogger(__name__)

# (entry id, field -> value), as Redis returns them.
Entry = tuple[bytes, dict[bytes, bytes]]

# Entries per XREAD batch (all streams together) and per XRANGE page.
READ_COUNT = 1000
PAGE = 500
# Milliseconds one XREAD may block; a silent connection is checked after this.
BLOCK_MS = 5000
# Seconds between two XTRIMs of one stream (channels with `stream_maxlen`).
TRIM_EVERY = 1.0
# XRANGE round trips in flight for all resuming clients together.
MAX_REPLAY_READS = 16
# Seconds between two checks, on an empty replay read, that the master did not move.
MASTER_CHECK = 0.5


def _key_fault(exc: Exception) -> bool:
    """True for an error reply about one key (it holds no stream, or the ACL forbids
    it), not about the connection or the server (MOVED, LOADING, READONLY ...)."""
    if isinstance(exc, NoPermissionError):
        return True
    return type(exc) is ResponseError and str(exc).startswith("WRONGTYPE")


class StreamSource(Protocol):
    """The stream side as the hub and the HTTP app use it: a ``StreamReader``, or a
    worker's (``worker.FeedStreams``: its node's main process reads the streams)."""

    @property
    def ready(self) -> bool: ...
    def want(self, keys: Iterable[bytes]) -> None: ...
    def drop(self, keys: Iterable[bytes]) -> None: ...
    def set_streams(self, keys: Iterable[bytes]) -> None: ...
    async def wait_live(self, keys: Iterable[bytes], timeout: float) -> bool: ...
    async def read_range(
        self, key: bytes, after: bytes, until: bytes, count: int
    ) -> list[Entry]: ...
    async def first_id(self, key: bytes) -> bytes | None: ...
    async def run(self) -> None: ...


class StreamReplays:
    """``XRANGE`` for resuming clients: the replay reader of every topology (with
    Cluster each read goes to the master owning its key), separate from the reading
    of streams (in a worker: its node's main process reads them).

    A pool of up to ``MAX_REPLAY_READS`` connections, opened as reads need them: that
    many reads really are in flight at once, each on a connection of its own, so a read
    that fails (an error reply, a connection cut) fails alone and never touches another
    client's. A read whose connection turns out dead (Redis restarted while it idled) is
    tried once more; a read that cannot reach Redis makes the next ones fail at once for
    a while (the reconnect backoff) rather than each trying Redis again (their clients
    come back later). Cancel ``run()`` to close the pool.
    """

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self._client: Client | None = None
        self._replays = asyncio.Semaphore(MAX_REPLAY_READS)
        self._failed_until = 0.0
        self._next_master_check = 0.0
        self._backoff = Backoff(config)  # how long reads fail at once after one could not
        self._down = False

    async def read_range(self, key: bytes, after: bytes, until: bytes, count: int) -> list[Entry]:
        """Entries of ``key`` after ``after`` up to ``until`` (inclusive), oldest first.

        At most ``MAX_REPLAY_READS`` of these are in flight for the whole process, and
        a caller has one at a time: a resume storm queues here instead of loading Redis.
        """
        entries = await self._xrange(key, b"(" + after, until, count)
        return typing.cast(list[Entry], entries)

    async def first_id(self, key: bytes) -> bytes | None:
        """The id of the oldest entry ``key`` still has, or None when it is empty."""
        entries = await self._xrange(key, b"-", b"+", 1)
        return typing.cast(bytes, entries[0][0]) if entries else None

    async def _xrange(self, key: bytes, start: bytes, end: bytes, count: int) -> Any:
        async with self._replays:
            loop = asyncio.get_running_loop()
            if loop.time() < self._failed_until:
                raise RedisError("redis replay connection is down")
            client = self._pool()
            for attempt in (1, 2):
                try:
                    entries = await client.xrange(key, start, end, count=count)
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    if attempt == 1:
                        continue  # a pooled connection that died idle: once more
                    self._failed_until = loop.time() + self._backoff.next()
                    if not self._down:
                        self._down = True
                        why = str(exc) or type(exc).__name__
                        log.warning("redis replays unavailable", extra=fields(reason=why))
                    raise RedisError(f"stream replay failed: {exc}") from exc
                # (an error reply, RedisError, is this read's alone: it propagates)
                if self._down:
                    self._down = False
                    self._backoff.reset()
                    log.info("redis replays connected")
                if not entries and attempt == 1 and await self._master_moved(client):
                    continue  # read on a demoted master: read again on the new one
                return entries
        raise AssertionError("unreachable")

    async def _master_moved(self, client: Client) -> bool:
        """With Sentinel: an empty answer may come from a master demoted in a failover,
        which still answers reads with what it had (a resume would skip what it lacks):
        ask the sentinels, at most every MASTER_CHECK seconds."""
        now = asyncio.get_running_loop().time()
        if now < self._next_master_check:
            return False
        self._next_master_check = now + MASTER_CHECK
        return await master_moved(client)

    def _pool(self) -> Client:
        if self._client is None:
            cfg = self.config
            self._client = command_client(
                cfg,
                socket_timeout=cfg.connect_timeout + cfg.health_check_timeout,
                max_connections=MAX_REPLAY_READS,
            )
        return self._client

    async def run(self) -> None:
        """Hold the pool until cancelled, then close it."""
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the pool's connections (a later read opens new ones)."""
        client, self._client = self._client, None
        if client is not None:
            await close(client)


class StreamReader(Source):
    """Reads every wanted stream from where it left off; cancel ``run()`` to stop."""

    log = log
    up_line = "redis streams reading"
    down_line = "redis streams down"
    unavailable_line = "redis streams unavailable"

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
        replays: StreamReplays | None = None,
    ) -> None:
        super().__init__(config, on_state)
        self._on_failed = on_failed
        self._on_entries = on_entries
        self._on_start = on_start
        self._prefill = prefill
        self._maxlen = maxlen
        # Stream -> loop time of its last XTRIM (streams with a `stream_maxlen`).
        self._trimmed: dict[bytes, float] = {}
        self._trimmer: asyncio.Task[None] | None = None
        # Streams being read, each with the id of the last entry delivered.
        self.positions: dict[bytes, bytes] = {}
        # Wanted streams whose start has not been read yet.
        self._pending: set[bytes] = set()
        self._changed = asyncio.Event()
        self._waiters = Waiters()
        self._control: aioredis.Redis | None = None
        self._reader_id: int | None = None
        self._blocked = False
        self._unblocker: asyncio.Task[None] | None = None
        # Replay reads (resuming clients' XRANGE): a pool of their own, opened on use
        # (Cluster's slot readers share their cluster reader's, which closes it).
        self._own_replays = replays is None
        self.replays = StreamReplays(config) if replays is None else replays

    # --- what the hub asks for ------------------------------------------------------

    @property
    def wanted(self) -> set[bytes]:
        return set(self.positions) | self._pending

    def want(self, keys: Iterable[bytes]) -> None:
        """Start reading ``keys`` (from their current end)."""
        new = [k for k in keys if k not in self.positions and k not in self._pending]
        if new:
            self._pending.update(new)
            self._wake()

    def drop(self, keys: Iterable[bytes]) -> None:
        """Stop reading ``keys``."""
        changed = False
        for k in keys:
            if self.positions.pop(k, None) is not None:
                changed = True
            if k in self._pending:
                self._pending.discard(k)
                changed = True
            self._waiters.forget(k)
            self._trimmed.pop(k, None)
        if changed:
            self._wake()

    def _fail(self, key: bytes, reason: str) -> None:
        """Redis refused to read ``key``: drop it (never retried in the shared read)
        and tell the owner, whose streams of it must end."""
        if key not in self.positions and key not in self._pending:
            return
        self.drop((key,))
        shown = key.decode(errors="backslashreplace")[:200]
        log.warning("stream dropped: redis refused it", extra=fields(key=shown, reason=reason))
        if self._on_failed is not None:
            try:
                self._on_failed(key, reason)
            except Exception:  # as with delivery: the owner's bug must not end the reading
                log.exception("stream failure listener failed", extra=fields(key=shown))

    def resume(self, positions: dict[bytes, bytes]) -> None:
        """Go on reading streams from known positions (Redis Cluster: streams whose slot
        moved here from another master): no new start, nothing prefilled again."""
        for k, position in positions.items():
            self._pending.discard(k)
            self.positions[k] = position
        if positions:
            self._wake()

    def handover(self) -> dict[bytes, bytes | None]:
        """Every wanted stream with its position (None: not started yet), for ``resume``
        or ``want`` on the reader that takes them over."""
        moving: dict[bytes, bytes | None] = dict.fromkeys(self._pending)
        moving.update(self.positions)
        return moving

    def set_streams(self, keys: Iterable[bytes]) -> None:
        """Read exactly ``keys`` from now on (config reload)."""
        new = set(keys)
        self.drop(self.wanted - new)
        self.want(new - self.wanted)

    def live(self, key: bytes) -> bool:
        """True once the reader knows where ``key`` starts: its events will all arrive."""
        return key in self.positions

    async def wait_live(self, keys: Iterable[bytes], timeout: float) -> bool:
        """True once every one of ``keys`` is live; False after ``timeout``."""
        return await self._waiters.wait(keys, self.positions.__contains__, timeout)

    @property
    def ready(self) -> bool:
        return self.state is BrokerState.UP

    async def read_range(self, key: bytes, after: bytes, until: bytes, count: int) -> list[Entry]:
        """As ``StreamReplays.read_range``: on the replay reader's connections, never on
        the reader's own (a resume storm must not delay the reading, nor share its fate)."""
        return await self.replays.read_range(key, after, until, count)

    async def first_id(self, key: bytes) -> bytes | None:
        """As ``StreamReplays.first_id``."""
        return await self.replays.first_id(key)

    # --- the loop ---------------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        if self._blocked and self._unblocker is None:
            # The reader sits in XREAD with the old set of streams: end that wait.
            self._unblocker = asyncio.get_running_loop().create_task(self._unblock())

    async def _unblock(self) -> None:
        try:
            # Redis may not have the XREAD yet when the UNBLOCK arrives (two
            # connections): try again while the reader still waits with old streams.
            for _ in range(50):
                control, reader_id = self._control, self._reader_id
                if not self._blocked or control is None or reader_id is None:
                    return
                if await control.client_unblock(reader_id):
                    return
                await asyncio.sleep(0.01)
        except (RedisError, OSError) as exc:  # the session is ending; it will start over
            log.debug("stream reader unblock failed", extra=fields(error=str(exc)))
        finally:
            self._unblocker = None

    def _client(self, socket_timeout: float | None) -> aioredis.Redis:
        client = command_client(self.config, socket_timeout=socket_timeout, single=True)
        assert isinstance(client, aioredis.Redis)  # one node: never a cluster client
        return client

    def up_fields(self) -> dict[str, Any]:
        return {"streams": len(self.wanted)}

    async def run(self) -> None:
        """Connect, read forever, reconnect with capped jittered backoff."""
        try:
            await self.reconnect_forever(self._session, self._until_wanted)
        finally:
            if self._own_replays:
                await self.replays.aclose()

    async def _until_wanted(self) -> None:
        # No connection until there is a stream to read: hubs without stream
        # channels never open one.
        while not self.wanted:
            self._changed.clear()
            await self._changed.wait()

    async def _session(self) -> None:
        cfg = self.config
        reader = self._client(socket_timeout=None)  # XREAD blocks; its own deadline below
        control = self._client(socket_timeout=cfg.connect_timeout + cfg.health_check_timeout)
        try:
            self._reader_id = int(await reader.client_id())
            await control.ping()
            self._control = control
            self.mark_up()
            while True:
                await self._read_once(reader, control)
        finally:
            self._control = None
            self._reader_id = None
            self._blocked = False
            for task in (self._unblocker, self._trimmer):
                if task is not None:
                    task.cancel()
            await close(reader, control)

    async def _start(self, control: aioredis.Redis) -> None:
        """Find where each pending stream ends (one pipelined round trip for them all).

        Apart from the shared XREAD, and with each reply on its own: a key Redis
        refuses (a name a client chose that holds no stream) fails alone, before it
        could ever join the XREAD of the others.
        """
        keys = sorted(self._pending)
        pipe = control.pipeline(transaction=False)
        for key in keys:
            pipe.xrevrange(key, count=max(1, self._prefill(key)))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        for key, newest_first in zip(keys, replies, strict=True):
            if key not in self._pending:
                continue  # dropped while we asked
            if isinstance(newest_first, Exception):
                if not _key_fault(newest_first):
                    raise newest_first  # the connection's or the server's: the session's
                self._fail(key, str(newest_first))
                continue
            self._pending.discard(key)
            entries = list(reversed(newest_first or []))
            self.positions[key] = entries[-1][0] if entries else b"0-0"
            self._on_start(key, entries)
            self._waiters.wake(key)

    async def _read_once(self, reader: aioredis.Redis, control: aioredis.Redis) -> None:
        self._changed.clear()
        # Streams wanted while a start was on its way are started too before the XREAD:
        # else they would wait for its BLOCK to end.
        while self._pending:
            await self._start(control)
        if not self.positions:
            # Nothing to read: wait for a stream, and check the connection meanwhile.
            # (asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel
            # that lands as the awaited call completes, and the hub's stop would hang.)
            try:
                async with asyncio.timeout(self.config.health_check_interval):
                    await self._changed.wait()
            except TimeoutError:
                async with asyncio.timeout(self.config.health_check_timeout):
                    await reader.ping()
            return
        streams: Any = dict(self.positions)
        deadline = BLOCK_MS / 1000 + self.config.health_check_timeout
        self._blocked = True
        try:
            async with asyncio.timeout(deadline):
                reply: Any = await reader.xread(streams, count=READ_COUNT, block=BLOCK_MS)
        except TimeoutError:
            raise SessionEnded(f"no answer to XREAD within {deadline:g}s") from None
        except ResponseError as exc:
            # A key that held a stream when it started holds something else now: find
            # it and drop it; the others go on in the same session.
            if not _key_fault(exc) or not await self._find_faults(control, list(streams)):
                raise
            return
        finally:
            self._blocked = False
        grown = []
        for key, entries in reply or ():
            if key not in self.positions or not entries:
                continue  # dropped while we read
            self.positions[key] = entries[-1][0]
            self._on_entries(key, entries)
            grown.append(key)
        self._trim(control, grown)

    async def _find_faults(self, control: aioredis.Redis, keys: list[bytes]) -> bool:
        """Drop the ``keys`` that are no stream now (one pipelined TYPE for them all);
        False when none is (the error was not theirs)."""
        pipe = control.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        found = False
        for key, kind in zip(keys, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(kind, Exception):
                if not _key_fault(kind):
                    raise kind
                self._fail(key, str(kind))
                found = True
            elif kind not in (b"stream", b"none"):
                self._fail(key, f"WRONGTYPE the key holds a {kind.decode(errors='replace')}")
                found = True
        return found

    def _trim(self, control: aioredis.Redis, keys: list[bytes]) -> None:
        """``XTRIM key MAXLEN ~ N`` for streams that grew, at most every TRIM_EVERY s each."""
        now = asyncio.get_running_loop().time()
        due = [
            (k, n)
            for k in keys
            if (n := self._maxlen(k)) > 0 and now - self._trimmed.get(k, 0.0) >= TRIM_EVERY
        ]
        if not due or self._trimmer is not None:
            return
        for k, _ in due:
            self._trimmed[k] = now

        async def trim() -> None:
            try:
                pipe = control.pipeline(transaction=False)
                for k, n in due:
                    pipe.xtrim(k, maxlen=n, approximate=True)
                await pipe.execute()
            except (RedisError, OSError) as exc:  # next time, or the next session
                log.debug("stream trim failed", extra=fields(error=str(exc)))
            finally:
                self._trimmer = None

        # Off the reading path: the next XREAD does not wait for the trim.
        self._trimmer = asyncio.get_running_loop().create_task(trim())
