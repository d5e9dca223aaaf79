"""Stream channels: events from Redis Streams, ids that are entry ids, exact resume anywhere."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from ssehub.config import ConfigError, parse
from ssehub.server import HubServer

from .conftest import StartHub, hub_config
from .sseclient import open_stream, wait_until
from .test_faults import kill_pubsub_clients


def key(name: str) -> str:
    return f"test:{name}"


async def start(start_hub: StartHub, channels: dict[str, Any], **overrides: Any) -> HubServer:
    hub = await start_hub(channels, wait_ready=False, **overrides)
    await wait_until(lambda: hub.ready, timeout=10)
    return hub


async def xadd(client: aioredis.Redis, stream: str, **fields: str) -> str:
    entry_id = await client.xadd(stream, fields)  # type: ignore[arg-type]
    return entry_id.decode()


async def kill_clients(admin: aioredis.Redis) -> int:
    command = admin.execute_command  # untyped in redis-py
    return int(await command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))  # type: ignore[no-untyped-call]


# --- config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "where", "reason"),
    [
        ({"o": {"stream": "o", "redis_channel": "x"}}, "channels.o.redis_channel", "stream"),
        ({"o": {"stream_maxlen": 5}}, "channels.o.stream_maxlen", "only stream"),
        ({"o.*": {"stream": "orders"}}, "channels.o.*.stream", "'*'"),
        ({"o": {"rewind": 500}}, "channels.o.rewind", "max_rewind"),
    ],
)
def test_bad_stream_config_names_the_key(channels: dict[str, Any], where: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"channels": channels}, source="x.yaml")
    assert err.value.key == where
    assert reason in err.value.reason


def test_a_stream_channel_has_no_pubsub_channel() -> None:
    config = hub_config("redis://127.0.0.1:1/0", {"orders": {"stream": "app:orders"}})
    assert config.channels["orders"].redis_channel == ""


# --- delivery -----------------------------------------------------------------------


async def test_entries_become_events_with_their_entry_ids(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("fields")
    hub = await start(start_hub, {"orders": {"stream": stream, "format": "json"}})
    c = await open_stream(hub.port, "/channels/orders")
    try:
        assert c.parser.last_id == "0-0"  # an empty stream's position
        a = await xadd(redis_client, stream, data='{"total": 3}')
        b = await xadd(redis_client, stream, data='"text"', event="note", retry="2500")
        events = await c.next_events(2)
        assert [(e.id, e.event, e.data) for e in events] == [
            (a, "message", '{"total":3}'),
            (b, "note", "text"),
        ]
        assert events[1].retry == 2500
        assert not await redis_client.pubsub_channels()  # no pub/sub for a stream channel
    finally:
        await c.close()


async def test_a_bad_entry_is_rejected_and_the_reader_goes_on(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("bad")
    hub = await start(start_hub, {"orders": {"stream": stream, "format": "json"}})
    c = await open_stream(hub.port, "/channels/orders")
    try:
        await xadd(redis_client, stream, nodata="x")
        await xadd(redis_client, stream, data="{not json")
        await xadd(redis_client, stream, data='"ok"', colour="red")
        await xadd(redis_client, stream, data='"ok"', event="a\nb")
        good = await xadd(redis_client, stream, data='"fine"')
        (event,) = await c.next_events(1)
        assert (event.id, event.data) == (good, "fine")
        rejected = hub.hub.stats.rejected
        assert rejected[("orders", "bad_field")] == 3
        assert rejected[("orders", "invalid_json")] == 1
    finally:
        await c.close()


async def test_the_first_position_is_the_streams_newest_entry(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("newest")
    older = [await xadd(redis_client, stream, data=f"old {i}") for i in range(3)]
    hub = await start(start_hub, {"orders": {"stream": stream}})
    c = await open_stream(hub.port, "/channels/orders")
    try:
        assert c.parser.last_id == older[-1]
        assert c.events == []  # a first connection starts with what comes next
        new = await xadd(redis_client, stream, data="new")
        assert [(e.id, e.data) for e in await c.next_events(1)] == [(new, "new")]
    finally:
        await c.close()


async def test_resume_after_a_hub_restart_replays_what_was_added_meanwhile(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("restart")
    channels = {"orders": {"stream": stream}}
    first = await start(start_hub, channels)
    c = await open_stream(first.port, "/channels/orders")
    seen = await xadd(redis_client, stream, data="before")
    (event,) = await c.next_events(1)
    assert event.id == seen
    await c.close()
    await first.stop()
    missed = [await xadd(redis_client, stream, data=f"while down {i}") for i in range(3)]
    second = await start(start_hub, channels)
    back = await open_stream(second.port, "/channels/orders", last_id=seen)
    try:
        after = await xadd(redis_client, stream, data="after")
        events = await back.next_events(4)
        assert [e.id for e in events] == [*missed, after]
        assert not [e for e in events if e.event == "ssehub-gap"]
    finally:
        await back.close()


async def test_a_reader_reconnect_loses_and_doubles_nothing(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("kill")
    hub = await start(start_hub, {"orders": {"stream": stream}})
    c = await open_stream(hub.port, "/channels/orders")
    try:
        ids = [await xadd(redis_client, stream, data="one")]
        await c.next_events(1)
        for round_ in (1, 2):
            assert await kill_clients(redis_client) >= 2  # the reader and its control link
            ids += [await xadd(redis_client, stream, data=f"during {round_}.{i}") for i in range(3)]
            await wait_until(lambda r=round_: hub.streams.reconnects >= r, timeout=5)
        ids.append(await xadd(redis_client, stream, data="last"))
        events = await c.next_events(len(ids))
        assert [e.id for e in events] == ids
        assert not [e for e in events if e.event == "ssehub-gap"]
        assert hub.hub.stats.gaps["orders"] == 0
    finally:
        await c.close()


async def test_a_pubsub_outage_signals_no_gap_on_stream_channels(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("nogap")
    hub = await start(start_hub, {"orders": {"stream": stream}, "chat": {}})
    orders = await open_stream(hub.port, "/channels/orders")
    chat = await open_stream(hub.port, "/channels/chat")
    try:
        assert await kill_pubsub_clients(redis_client) == 1
        await wait_until(lambda: hub.broker.reconnects == 1 and hub.ready, timeout=5)
        await chat.read_until(lambda c: any(e.event == "ssehub-gap" for e in c.events))
        entry = await xadd(redis_client, stream, data="x")
        (event,) = await orders.next_events(1)
        assert event.id == entry
    finally:
        await orders.close()
        await chat.close()


async def test_a_family_of_stream_channels_reads_each_member_while_it_has_browsers(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start(start_hub, {"orders.*": {"stream": "test:orders:*", "grace": 0.2}})
    a = await open_stream(hub.port, "/channels/orders.a")
    b = await open_stream(hub.port, "/channels/orders.b")
    try:
        ea = await xadd(redis_client, "test:orders:a", data="for a")
        eb = await xadd(redis_client, "test:orders:b", data="for b")
        assert [(e.id, e.data) for e in await a.next_events(1)] == [(ea, "for a")]
        assert [(e.id, e.data) for e in await b.next_events(1)] == [(eb, "for b")]
        assert set(hub.streams.positions) == {b"test:orders:a", b"test:orders:b"}
        await a.close()
        await wait_until(lambda: set(hub.streams.positions) == {b"test:orders:b"}, timeout=3)
    finally:
        await b.close()


async def test_two_hub_nodes_serve_the_same_ids(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("nodes")
    channels = {"orders": {"stream": stream}}
    one = await start(start_hub, channels)
    two = await start(start_hub, channels)
    c = await open_stream(one.port, "/channels/orders")
    entry = await xadd(redis_client, stream, data="first")
    (event,) = await c.next_events(1)
    await c.close()
    missed = await xadd(redis_client, stream, data="moved")
    moved = await open_stream(two.port, "/channels/orders", last_id=event.id)
    try:
        assert event.id == entry
        (replayed,) = await moved.next_events(1)
        assert (replayed.id, replayed.data) == (missed, "moved")
    finally:
        await moved.close()


async def test_stream_maxlen_trims_the_stream(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("trim")
    hub = await start(start_hub, {"orders": {"stream": stream, "stream_maxlen": 10}})
    c = await open_stream(hub.port, "/channels/orders")
    try:
        pipe = redis_client.pipeline(transaction=False)
        for i in range(500):
            pipe.xadd(stream, {"data": str(i)})
        await pipe.execute()
        await c.next_events(500, timeout=10)

        async def trimmed() -> bool:
            # MAXLEN ~ trims whole macro nodes (100 entries by default): approximate.
            return int(await redis_client.xlen(stream)) <= 110

        await wait_until(trimmed, timeout=5)
    finally:
        await c.close()
