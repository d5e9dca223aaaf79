"""The stream reader itself (ssehub/redis/streams.py), against a real Redis: a key that
fails fails alone, a new stream never waits for the shared XREAD's block, and what a
dropped stream leaves behind is forgotten."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ssehub.config import RedisConfig
from ssehub.redis.factory import create_replays, create_stream_reader
from ssehub.redis.pubsub import BrokerState
from ssehub.redis.streams import BLOCK_MS, Entry, StreamReader

from .conftest import StartHub
from .redis_server import RedisServer
from .sseclient import SSEClient, http_request, open_stream, wait_until


@dataclass
class Seen:
    """What a reader handed over: entries, starts and failures, by key."""

    entries: dict[bytes, list[bytes]] = field(default_factory=dict)
    started: list[bytes] = field(default_factory=list)
    failed: dict[bytes, str] = field(default_factory=dict)

    def on_entries(self, key: bytes, entries: list[Entry]) -> None:
        self.entries.setdefault(key, []).extend(e[1][b"data"] for e in entries)

    def on_start(self, key: bytes, entries: list[Entry]) -> None:
        self.started.append(key)

    def on_failed(self, key: bytes, reason: str) -> None:
        self.failed[key] = reason


@contextlib.asynccontextmanager
async def running(role: Any) -> AsyncIterator[Any]:
    task = asyncio.create_task(role.run())
    try:
        yield role
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def reader_for(redis_server: RedisServer, seen: Seen, **more: object) -> StreamReader:
    config = RedisConfig(url=redis_server.url, reconnect_min=0.01, reconnect_max=0.05)
    reader = create_stream_reader(
        config, seen.on_entries, seen.on_start, lambda key: 10, on_failed=seen.on_failed, **more
    )
    assert isinstance(reader, StreamReader)
    return reader


async def test_a_stream_wanted_while_others_start_does_not_wait_for_the_block(
    redis_server: RedisServer,
) -> None:
    """A key wanted while the reader awaits the start of others must not wait for the
    shared XREAD's BLOCK (5 s) to go live."""
    seen = Seen()
    reader = reader_for(redis_server, seen)

    def on_start(key: bytes, entries: list[Entry]) -> None:
        seen.on_start(key, entries)
        if key == b"sr:first":  # the reader is inside _start: another stream arrives
            reader.want([b"sr:second"])

    reader._on_start = on_start
    reader.want([b"sr:first"])
    async with running(reader):
        assert await reader.wait_live([b"sr:first"], 5)
        # Well within the BLOCK (5 s), with room for a loaded machine.
        assert await reader.wait_live([b"sr:second"], BLOCK_MS / 1000 / 2)


async def test_a_dropped_stream_leaves_no_trim_time_behind(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    seen = Seen()
    reader = reader_for(redis_server, seen, maxlen=lambda key: 5)
    keys = [f"sr:trim:{i}".encode() for i in range(3)]
    reader.want(keys)
    async with running(reader):
        assert await reader.wait_live(keys, 5)

        async def all_trimmed() -> bool:
            # (a stream that grows while a trim is on its way waits for the next growth)
            missing = set(keys) - set(reader._trimmed)
            for k in missing:
                await redis_client.xadd(k, {"data": "x"})
            return not missing

        await wait_until(all_trimmed, timeout=5)
        reader.drop(keys[:2])
        assert set(reader._trimmed) == {keys[2]}
        reader.set_streams([])
        assert reader._trimmed == {}


@pytest.mark.parametrize("when", ["before_start", "after_start"])
async def test_a_key_that_is_not_a_stream_fails_alone(
    redis_server: RedisServer, redis_client: aioredis.Redis, when: str
) -> None:
    """Issue 19, defect 1: a client-chosen key holding a string (WRONGTYPE) is dropped
    and reported; the shared session goes on, the other streams keep flowing."""
    seen = Seen()
    reader = reader_for(redis_server, seen)
    good, evil = f"sr:good:{when}".encode(), f"sr:evil:{when}".encode()
    await redis_client.delete(good, evil)
    if when == "before_start":
        await redis_client.set(evil, "not a stream")
    reader.want([good])
    async with running(reader):
        assert await reader.wait_live([good], 5)
        reader.want([evil])
        if when == "after_start":
            # Started while it did not exist, then written as a string: XREAD's turn.
            assert await reader.wait_live([evil], 5)
            await redis_client.set(evil, "not a stream")
            await redis_client.xadd(good, {"data": "nudge"})  # XREAD runs again
        await wait_until(lambda: evil in seen.failed, timeout=5)
        assert "WRONGTYPE" in seen.failed[evil]
        assert evil not in reader.wanted
        await redis_client.xadd(good, {"data": "after"})
        await wait_until(lambda: b"after" in seen.entries.get(good, []), timeout=5)
        assert reader.state is BrokerState.UP and reader.reconnects == 0


async def test_a_family_member_whose_key_is_no_stream_ends_alone(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """Issue 19, defect 1, as reproduced: one anonymous request for a member whose key
    holds a string must not stop the other stream channels or turn /readyz 503."""
    await redis_client.delete("app:orders:evil", "app:orders:good", "sr:news")
    await redis_client.set("app:orders:evil", "x")
    hub = await start_hub(
        {"orders.*": {"stream": "app:orders:*"}, "news": {"stream": "sr:news"}},
        wait_ready=False,
        redis={"url": hub_url(redis_client), "reconnect_min": 0.01, "reconnect_max": 0.05},
    )
    await wait_until(lambda: hub.ready, timeout=10)
    news = await open_stream(hub.port, "/channels/news")
    good = await open_stream(hub.port, "/channels/orders.good")
    evil = await SSEClient.connect(hub.port, "/channels/orders.evil")
    try:
        assert evil.status == 200
        await evil.read_to_eof(timeout=5)
        assert evil.ended_cleanly
        assert hub.hub.stats.stream_errors["orders.*"] == 1
        assert "orders.evil" not in hub.hub.channels
        status, _, _ = await http_request(hub.port, "/readyz")
        assert status == 200
        await redis_client.xadd("sr:news", {"data": "news after"})
        await redis_client.xadd("app:orders:good", {"data": "good after"})
        assert [e.data for e in await news.next_events(1)] == ["news after"]
        assert [e.data for e in await good.next_events(1)] == ["good after"]
        assert hub.streams.reconnects == 0 and hub.streams.ready
    finally:
        for c in (news, good, evil):
            await c.close()


async def test_a_listed_channel_whose_key_is_fixed_serves_again_without_a_reload(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """A listed channel's key that holds no stream is tried again at each heartbeat:
    browsers wait meanwhile (heartbeats, never an error), and once the key is fixed in
    Redis the channel serves them without a reload."""
    await redis_client.delete("sr:listed")
    await redis_client.set("sr:listed", "not a stream")
    hub = await start_hub(
        {"orders": {"stream": "sr:listed"}},
        wait_ready=False,
        heartbeat=0.2,
        redis={"url": hub_url(redis_client), "reconnect_min": 0.01, "reconnect_max": 0.05},
    )
    await wait_until(lambda: hub.ready, timeout=10)
    c = await SSEClient.connect(hub.port, "/channels/orders")
    try:
        assert c.status == 200
        # Tried again, refused again, counted each time; the browser waits with heartbeats.
        await wait_until(lambda: hub.hub.stats.stream_errors["orders"] >= 2, timeout=5)
        await c.read_until(lambda c: c.body.count(b":\n") >= 2 and not c.eof)
        assert c.parser.last_id == ""
        async with redis_client.pipeline(transaction=True) as fix:  # one step for the hub
            fix.delete("sr:listed")
            fix.xadd("sr:listed", {"data": "first"})
            first = (await fix.execute())[1]
        await c.read_until(lambda c: c.parser.last_id == first.decode(), timeout=5)
        await redis_client.xadd("sr:listed", {"data": "after the fix"})
        assert [e.data for e in await c.next_events(1)] == ["after the fix"]
        assert hub.streams.reconnects == 0 and hub.streams.ready
    finally:
        await c.close()


def hub_url(client: aioredis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/0"


# --- replay reads -----------------------------------------------------------------------

BAD_ID = b"1-99999999999999999999"  # a sequence past 2^64-1: Redis refuses the XRANGE


@pytest.mark.parametrize("role", ["replays", "reader"])
async def test_replay_reads_run_side_by_side_and_fail_alone(
    redis_server: RedisServer, redis_client: aioredis.Redis, role: str
) -> None:
    """Issue 20 (its Redis side): reads Redis refuses, among honest ones, fail alone; and
    the honest ones really run side by side (the single-connection client made
    MAX_REPLAY_READS reads in flight one read at a time, and dropped the connection
    the others were reading on when one failed)."""
    key = f"sr:replay:{role}".encode()
    await redis_client.delete(key)
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(2000):
            pipe.xadd(key, {"data": str(i)})
        ids = [i.decode() for i in await pipe.execute()]
    config = RedisConfig(url=redis_server.url, reconnect_min=0.01, reconnect_max=0.05)
    source: Any = create_replays(config)
    if role == "reader":
        source = reader_for(redis_server, Seen())
        source.want([key])
    async with running(source):
        if role == "reader":
            assert await source.wait_live([key], 5)

        async def honest() -> list[str]:
            entries = await source.read_range(key, b"0-0", b"+", 2000)
            return [e[0].decode() for e in entries]

        reads = [honest() if i % 3 else source.read_range(key, BAD_ID, b"+", 10) for i in range(90)]
        results = await asyncio.gather(*reads, return_exceptions=True)
        honest_results = [r for i, r in enumerate(results) if i % 3]
        bad_results = [r for i, r in enumerate(results) if not i % 3]
        assert all(r == ids for r in honest_results), [
            type(r).__name__ for r in honest_results if r != ids
        ]
        assert all(isinstance(r, RedisError) for r in bad_results)
        replay_connections = [c for c in await redis_client.client_list() if c["cmd"] == "xrange"]
        assert len(replay_connections) > 1  # the reads ran side by side
