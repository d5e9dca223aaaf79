"""Resumes from Redis share their reads: one window of older entries per stream channel."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from ssehub.hub.backfill import MAX_COUNT, MIN_COUNT, Window

from .conftest import StartHub
from .sseclient import SSEClient, open_stream, wait_until
from .test_streams import key, start, xadd


async def xrange_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))


async def fill(client: aioredis.Redis, stream: str, n: int, size: int = 20) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"data": f"{i:0{size}d}"})
    return [m.decode() for m in await pipe.execute()]


async def resume_all(port: int, last_ids: list[str]) -> list[SSEClient]:
    return list(
        await asyncio.gather(
            *(SSEClient.connect(port, "/channels/orders", {"Last-Event-ID": i}) for i in last_ids)
        )
    )


async def test_clients_resuming_from_one_position_share_one_read_of_redis(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """100 clients 300 entries behind the hub's memory: a read per client would be
    ~400 XRANGE calls (a first-id check, an exact check and pages each); shared, the
    window is read once and every client serves itself from it."""
    stream = key("shared")
    hub = await start(start_hub, {"orders": {"stream": stream, "history": 5}})
    first = await xadd(redis_client, stream, data="seen")
    ids = await fill(redis_client, stream, 300)
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == ids[-1])
    before = await xrange_calls(redis_client)
    clients = await resume_all(hub.port, [first] * 100)
    try:
        live = await xadd(redis_client, stream, data="live")
        for c in clients:
            events = await c.next_events(301, timeout=15)
            assert [e.id for e in events] == [*ids, live]
            assert not [e for e in events if e.event == "ssehub-gap"]
        calls = await xrange_calls(redis_client) - before
        assert calls <= 5, f"{calls} XRANGE calls for 100 clients resuming the same entries"
        assert hub.hub.stats.redis_replays["orders"] == 100
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_clients_resuming_from_nearby_positions_each_get_exactly_theirs_from_one_window(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("nearby")
    hub = await start(start_hub, {"orders": {"stream": stream, "history": 3}})
    ids = await fill(redis_client, stream, 400)
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == ids[-1])
    before = await xrange_calls(redis_client)
    # The youngest first: each older one extends the window backwards.
    starts = [300 - 3 * k for k in range(60)]
    clients = await resume_all(hub.port, [ids[s] for s in starts])
    try:
        for s, c in zip(starts, clients, strict=True):
            events = await c.next_events(len(ids) - s - 1, timeout=15)
            assert [e.id for e in events] == ids[s + 1 :]
        calls = await xrange_calls(redis_client) - before
        assert calls <= 60, f"{calls} XRANGE calls for 60 clients"
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_an_id_inside_the_window_that_is_no_entry_gets_unknown_id_without_a_read(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("hole")
    hub = await start(start_hub, {"orders": {"stream": stream, "history": 2}})
    a = await xadd(redis_client, stream, data="a")
    hole = await xadd(redis_client, stream, data="deleted")
    await redis_client.xdel(stream, hole)
    after = await fill(redis_client, stream, 50)
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == after[-1])
    (honest,) = await resume_all(hub.port, [a])  # reads the window from a
    try:
        assert [e.id for e in await honest.next_events(50, timeout=10)] == after
        before = await xrange_calls(redis_client)
        (foreign,) = await resume_all(hub.port, [hole])
        events = await foreign.next_events(51, timeout=10)
        assert events[0].event == "ssehub-gap"
        assert json.loads(events[0].data)["reason"] == "unknown_id"
        assert [e.id for e in events[1:]] == after
        assert await xrange_calls(redis_client) == before
        await foreign.close()
    finally:
        await honest.close()


async def test_a_window_stays_within_the_channels_history_bytes_and_loses_nothing(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """300 entries of ~120 bytes encoded through a window bounded to 8 KB: it is read
    in parts and trimmed, never holds more than the bound between two steps of the
    loop (the watcher looks at every one), and every client still gets every entry
    exactly once."""
    stream = key("bounded")
    bound = 8 * 1024
    channels = {"orders": {"stream": stream, "history": 3, "history_bytes": bound}}
    hub = await start(start_hub, channels)
    ids = await fill(redis_client, stream, 300, size=80)
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == ids[-1])
    backfill = hub.hub.backfill
    largest = 0

    def watch() -> bool:
        nonlocal largest
        window = backfill.windows.get(hub.hub.channels["orders"])
        largest = max(largest, window.size if window else 0)
        return False

    watcher = asyncio.create_task(wait_until(watch, timeout=30, interval=0))
    clients = await resume_all(hub.port, [ids[0], ids[100], ids[0]])
    try:
        for s, c in zip([0, 100, 0], clients, strict=True):
            events = await c.next_events(len(ids) - s - 1, timeout=15)
            assert [e.id for e in events] == ids[s + 1 :]
        assert 0 < largest <= bound
        window = backfill.windows[hub.hub.channels["orders"]]
        assert window.size <= bound
    finally:
        watcher.cancel()
        await asyncio.gather(*(c.close() for c in clients))


async def test_a_window_no_resume_uses_is_dropped_at_the_next_heartbeats(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("idle")
    hub = await start(start_hub, {"orders": {"stream": stream, "history": 2}}, heartbeat=0.2)
    ids = await fill(redis_client, stream, 30)
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == ids[-1])
    (c,) = await resume_all(hub.port, [ids[0]])
    try:
        assert [e.id for e in await c.next_events(29)] == ids[1:]
        assert hub.hub.backfill.windows  # read for that resume
        await wait_until(lambda: not hub.hub.backfill.windows, timeout=5)
    finally:
        await c.close()


async def test_entries_the_format_rejects_are_skipped_by_every_client_sharing_the_window(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("rejects")
    hub = await start(start_hub, {"orders": {"stream": stream, "history": 2, "format": "json"}})
    first = await xadd(redis_client, stream, data='"seen"')
    good: list[str] = []
    for i in range(40):
        if i % 7 == 3:
            await xadd(redis_client, stream, data="{not json")
        else:
            good.append(await xadd(redis_client, stream, data=json.dumps(i)))
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == good[-1])
    clients = await resume_all(hub.port, [first, first, good[2]])
    try:
        for start_at, c in zip([0, 0, 3], clients, strict=True):
            events = await c.next_events(len(good) - start_at, timeout=10)
            assert [e.id for e in events] == good[start_at:]
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_windows_of_many_members_stay_within_a_quarter_of_the_hubs_history_bytes(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """Clients resuming 20 family members of their choosing from their first entries:
    the members' windows together never hold more than a quarter of
    ``limits.history_bytes`` (each at most a sixteenth of that), the least recently
    used are dropped, and every client still gets every entry exactly once."""
    members = [f"m{i}" for i in range(20)]
    streams = {m: await fill(redis_client, key(f"many:{m}"), 100, size=80) for m in members}
    limits = {"history_bytes": 256 * 1024}  # windows: 64 KiB in all, 4 KiB each
    channels = {"fam.*": {"stream": key("many:*"), "history": 2}}
    hub = await start(start_hub, channels, limits=limits)
    backfill = hub.hub.backfill
    largest_total = largest_one = 0

    def watch() -> bool:
        nonlocal largest_total, largest_one
        sizes = [w.size for w in backfill.windows.values()]
        largest_total = max(largest_total, sum(sizes))
        largest_one = max([largest_one, *sizes])
        return False

    first = await asyncio.gather(*(open_stream(hub.port, f"/channels/fam.{m}") for m in members))
    for c in first:
        await c.close()
    watcher = asyncio.create_task(wait_until(watch, timeout=60, interval=0))
    clients = list(
        await asyncio.gather(
            *(
                SSEClient.connect(hub.port, f"/channels/fam.{m}", {"Last-Event-ID": ids[0]})
                for m, ids in streams.items()
            )
        )
    )
    try:
        for m, c in zip(members, clients, strict=True):
            events = await c.next_events(99, timeout=15)
            assert [e.id for e in events] == streams[m][1:]
        assert 0 < largest_one <= 4 * 1024
        assert 16 * 1024 < largest_total <= 64 * 1024
    finally:
        watcher.cancel()
        await asyncio.gather(*(c.close() for c in clients))


def test_a_first_read_asks_for_a_few_entries_then_about_a_read_of_bytes() -> None:
    """Entries may be up to ``max_message_bytes`` each: a window's first XRANGE asks
    for MIN_COUNT of them, later ones for about ``read_bytes`` by the mean size seen."""
    window = Window()
    assert window.count() == MIN_COUNT
    assert window.count(size=10 * 1000, entries=10, read_bytes=64 * 1000) == 64
    assert window.count(size=10 * 1_000_000, entries=10) == MIN_COUNT  # never fewer
    assert window.count(size=10 * 10, entries=10) == MAX_COUNT  # never more
