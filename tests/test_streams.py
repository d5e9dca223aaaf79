"""Stream channels: events from Redis Streams, ids that are entry ids, exact resume anywhere."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
import redis.asyncio as aioredis

from ssehub.config import ConfigError, parse
from ssehub.server import HubServer

from .conftest import StartHub, hub_config
from .redis_server import RedisServer
from .sseclient import SSEClient, http_request, open_stream, wait_until
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
        # No pub/sub for a stream channel (the subscription carries the control channel).
        assert await redis_client.pubsub_channels() == [b"ssehub:control"]
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
    # Node two reads the stream on its own connection: resume there once it has both.
    await wait_until(lambda: two.hub.channels["orders"].stream_pos == missed)
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


# --- resuming from further back than the cache --------------------------------------


async def test_resume_older_than_the_cache_reads_redis_and_meets_live_exactly(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """history: 5 keeps only the newest five in memory; a client 300 entries back is
    caught up from Redis in pages while entries keep arriving, then goes live."""
    stream = key("deep")
    hub = await start(start_hub, {"orders": {"stream": stream, "history": 5}})
    first = await xadd(redis_client, stream, data="seen")
    pipe = redis_client.pipeline(transaction=False)
    for i in range(300):
        pipe.xadd(stream, {"data": f"missed {i}"})
    missed = [m.decode() for m in await pipe.execute()]
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == missed[-1])
    back = await SSEClient.connect(hub.port, "/channels/orders", {"Last-Event-ID": first})
    try:
        live = [await xadd(redis_client, stream, data=f"live {i}") for i in range(20)]
        events = await back.next_events(320, timeout=10)
        assert [e.id for e in events] == missed + live
        assert not [e for e in events if e.event == "ssehub-gap"]
        assert hub.hub.stats.redis_replays["orders"] == 1
    finally:
        await back.close()


async def test_a_trimmed_id_gets_expired_then_what_the_stream_still_has(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("trimmed")
    hub = await start(start_hub, {"orders": {"stream": stream, "history": 2}})
    old = await xadd(redis_client, stream, data="old")
    kept = [await xadd(redis_client, stream, data=f"kept {i}") for i in range(5)]
    await redis_client.xtrim(stream, maxlen=5, approximate=False)  # "old" is gone
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == kept[-1])
    back = await SSEClient.connect(hub.port, "/channels/orders", {"Last-Event-ID": old})
    try:
        events = await back.next_events(6)
        assert events[0].event == "ssehub-gap"
        assert json.loads(events[0].data) == {
            "channel": "orders",
            "reason": "expired",
            "lastEventId": old,
        }
        assert [e.id for e in events[1:]] == kept
    finally:
        await back.close()


async def test_an_id_that_is_no_entry_gets_unknown_id_then_what_follows(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("foreign")
    hub = await start(start_hub, {"orders": {"stream": stream, "history": 1}})
    await xadd(redis_client, stream, data="a")
    foreign = await xadd(redis_client, stream, data="deleted")
    await redis_client.xdel(stream, foreign)  # in the stream's range, but no entry of it
    after = [await xadd(redis_client, stream, data=f"b {i}") for i in range(3)]
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == after[-1])
    back = await SSEClient.connect(hub.port, "/channels/orders", {"Last-Event-ID": foreign})
    try:
        events = await back.next_events(1 + len(after))
        assert events[0].event == "ssehub-gap"
        assert json.loads(events[0].data)["reason"] == "unknown_id"
        assert [e.id for e in events[1:]] == after
    finally:
        await back.close()


@pytest.mark.parametrize("last_id", ["garbage", "mx339x0v-3", "99999999999999-0"])
async def test_no_entry_id_or_one_from_the_future_gets_unknown_id_then_live(
    start_hub: StartHub, redis_client: aioredis.Redis, last_id: str
) -> None:
    stream = key("odd")
    await xadd(redis_client, stream, data="before")
    hub = await start(start_hub, {"orders": {"stream": stream}})
    back = await SSEClient.connect(hub.port, "/channels/orders", {"Last-Event-ID": last_id})
    try:
        await back.read_until(lambda c: c.parser.last_id != last_id and c.events)
        assert [e.event for e in back.events] == ["ssehub-gap"]
        assert json.loads(back.events[0].data)["reason"] == "unknown_id"
        entry = await xadd(redis_client, stream, data="live")
        assert [e.id for e in await back.next_events(2)][1:] == [entry]
    finally:
        await back.close()


async def test_many_clients_resuming_from_redis_at_once_each_get_exactly_theirs(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("storm")
    hub = await start(start_hub, {"orders": {"stream": stream, "history": 3}})
    pipe = redis_client.pipeline(transaction=False)
    for i in range(200):
        pipe.xadd(stream, {"data": str(i)})
    ids = [m.decode() for m in await pipe.execute()]
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == ids[-1])
    starts = [i * 2 for i in range(100)]  # client k resumes after entry 2k
    clients = await asyncio.gather(
        *(
            SSEClient.connect(hub.port, "/channels/orders", {"Last-Event-ID": ids[s]})
            for s in starts
        )
    )
    try:
        for s, c in zip(starts, clients, strict=True):
            events = await c.next_events(len(ids) - s - 1, timeout=15)
            assert [e.id for e in events] == ids[s + 1 :]
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_redis_restart_with_entries_added_meanwhile_loses_and_doubles_nothing(
    start_hub: StartHub,
) -> None:
    """A Redis that keeps its data (AOF) is killed and restarted; entries are added
    before the hub's reader is back: every one arrives once, with no gap signal."""
    redis = RedisServer("--appendonly", "yes", "--appendfsync", "always")
    redis.start()
    client = aioredis.Redis.from_url(redis.url)
    try:
        stream = key("restart-redis")
        hub = await start(start_hub, {"orders": {"stream": stream}}, redis_url=redis.url)
        c = await open_stream(hub.port, "/channels/orders")
        try:
            ids = [await xadd(client, stream, data="before")]
            await c.next_events(1)
            redis.kill()
            redis.start()  # same port, same data
            await client.aclose()
            client = aioredis.Redis.from_url(redis.url)
            ids += [await xadd(client, stream, data=f"after {i}") for i in range(3)]
            events = await c.next_events(4, timeout=10)
            assert [e.id for e in events] == ids
            assert not [e for e in events if e.event == "ssehub-gap"]
        finally:
            await c.close()
    finally:
        await client.aclose()
        redis.stop()


# --- /events with stream channels -----------------------------------------------------


async def test_events_ids_carry_every_stream_position_and_resume_exactly_on_another_node(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    channels = {
        "a": {"stream": key("mux-a"), "history": 2},
        "b": {"stream": key("mux-b"), "history": 2},
        "chat": {},
    }
    one = await start(start_hub, channels)
    two = await start(start_hub, channels)
    path = "/events?channel=chat&channel=b&channel=a"
    c = await open_stream(one.port, path)
    a1 = await xadd(redis_client, key("mux-a"), data="a1")
    await redis_client.publish("chat", "hello")
    b1 = await xadd(redis_client, key("mux-b"), data="b1")
    events = await c.next_events(3)
    await c.close()
    assert [(e.event, e.data) for e in events] == [("a", "a1"), ("chat", "hello"), ("b", "b1")]
    last = events[-1].id
    assert "~" in last and len(last) < 64
    # Meanwhile, on both streams (more than either node keeps in memory):
    for i in range(2, 6):
        await xadd(redis_client, key("mux-a"), data=f"a{i}")
    missed_b = [await xadd(redis_client, key("mux-b"), data=f"b{i}") for i in range(2, 6)]
    # (chat's message too: it reaches node two on another connection than the entries)
    await wait_until(
        lambda: (
            two.hub.channels["b"].stream_pos == missed_b[-1] and two.hub.stats.received["chat"] == 1
        )
    )
    back = await SSEClient.connect(two.port, path, {"Last-Event-ID": last})
    try:
        events = await back.next_events(9)
        # The chat position is the other node's: said once; the streams resume exactly.
        gaps = [json.loads(e.data) for e in events if e.event == "ssehub-gap"]
        assert [(g["channel"], g["reason"]) for g in gaps] == [("chat", "unknown_id")]
        replayed = [e for e in events if e.event != "ssehub-gap"]
        assert [(e.event, e.data) for e in replayed] == [("a", f"a{i}") for i in range(2, 6)] + [
            ("b", f"b{i}") for i in range(2, 6)
        ]
        # Every id names both positions: resuming from any of them again loses nothing.
        mid = replayed[5].id
        await back.close()
        again = await SSEClient.connect(two.port, path, {"Last-Event-ID": mid})
        rest = await again.next_events(3)  # the chat gap again, and what is left
        assert [(e.event, e.data) for e in rest if e.event != "ssehub-gap"] == [
            ("b", "b4"),
            ("b", "b5"),
        ]
        await again.close()
        assert a1 and b1
    finally:
        await back.close()


# --- rewind ---------------------------------------------------------------------------


async def test_rewind_starts_a_first_connection_with_the_last_events(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    stream = key("rewind")
    recent = [await xadd(redis_client, stream, data=f"s{i}") for i in range(5)]
    hub = await start(
        start_hub,
        {"orders": {"stream": stream}, "chat": {}, "prices": {"rewind": 2}},
        limits={"max_rewind": 3},
    )
    for i in range(5):
        await redis_client.publish("chat", f"c{i}")
        await redis_client.publish("prices", f"p{i}")
    await wait_until(lambda: len(hub.hub.channels["prices"].history) == 5)
    stream_client = await open_stream(hub.port, "/channels/orders?rewind=2")
    chat = await open_stream(hub.port, "/channels/chat?rewind=50")  # capped at 3
    prices = await open_stream(hub.port, "/channels/prices")  # the channel's default: 2
    plain = await open_stream(hub.port, "/channels/chat")
    resumed = await open_stream(
        hub.port, "/channels/orders?rewind=5", last_id=recent[-1]
    )  # a resume: no rewind
    try:
        assert [e.id for e in stream_client.events] == recent[-2:]
        assert stream_client.parser.last_id == recent[-1]
        assert [e.data for e in chat.events] == ["c2", "c3", "c4"]
        assert [e.data for e in prices.events] == ["p3", "p4"]
        assert plain.events == [] and resumed.events == []
        entry = await xadd(redis_client, stream, data="live")
        assert [e.id for e in await stream_client.next_events(3)][2:] == [entry]
        status, _, _ = await http_request(hub.port, "/channels/chat?rewind=-1")
        assert status == 400
    finally:
        for c in (stream_client, chat, prices, plain, resumed):
            await c.close()


async def test_rewind_on_events_and_family_members(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start(
        start_hub,
        {"news": {}, "room.*": {"stream": "test:room:*", "grace": 5}},
    )
    member = await open_stream(hub.port, "/channels/room.1")  # the member lives now
    for i in range(3):
        await xadd(redis_client, "test:room:1", data=f"r{i}")
        await redis_client.publish("news", f"n{i}")
    await member.next_events(3)
    # The pub/sub messages reach the hub apart from the stream entries: all in first.
    await wait_until(lambda: len(hub.hub.channels["news"].history) == 3)
    c = await open_stream(hub.port, "/events?channel=news&channel=room.1&rewind=2")
    try:
        # Each channel's last two, in the order the hub took them in (ids only grow).
        by_channel: dict[str, list[str]] = {}
        for e in c.events:
            by_channel.setdefault(e.event, []).append(e.data)
        assert by_channel == {"news": ["n1", "n2"], "room.1": ["r1", "r2"]}
        seqs = [int(e.id.split("~")[0].rpartition("-")[2]) for e in c.events]
        assert seqs == sorted(seqs)
    finally:
        await c.close()
        await member.close()


async def test_a_deeply_nested_entry_loses_nothing_else_live_or_on_resume(
    start_hub: StartHub, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """`[` x 5000 in one entry of a batch: rejected as invalid_json; the entries after it
    in the same batch are delivered, and a resume over it from Redis reads past it."""
    stream = key("deep-json")
    hub = await start(start_hub, {"orders": {"stream": stream, "format": "json", "history": 2}})
    first = await xadd(redis_client, stream, data='"before"')
    # A position the reader has not reached yet would be unknown_id, not a resume.
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == first)
    c = await open_stream(hub.port, "/channels/orders", last_id=first)
    try:
        pipe = redis_client.pipeline(transaction=True)  # one XREAD batch for the reader
        pipe.xadd(stream, {"data": "[" * 5000})
        for i in range(5):
            pipe.xadd(stream, {"data": f'"after {i}"'})
        ids = [i.decode() for i in await pipe.execute()]
        events = await c.next_events(5)
        expected = [(i, f"after {n}") for n, i in enumerate(ids[1:])]
        assert [(e.id, e.data) for e in events] == expected
        assert hub.hub.stats.rejected[("orders", "invalid_json")] == 1
    finally:
        await c.close()
    # history: 2 keeps only the last two: a resume from `first` pages through Redis.
    back = await open_stream(hub.port, "/channels/orders", last_id=first)
    try:
        events = await back.next_events(5)
        assert [e.id for e in events] == ids[1:]
        assert not [e for e in events if e.event == "ssehub-gap"]
    finally:
        await back.close()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


async def test_an_unexpected_error_on_one_entry_costs_that_entry_only(
    start_hub: StartHub, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = key("one-fails")
    hub = await start(start_hub, {"orders": {"stream": stream}})
    ingest = hub.hub.ingest._ingest

    def failing_on_b(channel: Any, event: Any) -> None:
        if event.data == "b":
            raise RuntimeError("a bug")
        ingest(channel, event)

    monkeypatch.setattr(hub.hub.ingest, "_ingest", failing_on_b)
    c = await open_stream(hub.port, "/channels/orders")
    try:
        pipe = redis_client.pipeline(transaction=True)  # one XREAD batch for the reader
        for data in "abcd":
            pipe.xadd(stream, {"data": data})
        await pipe.execute()
        assert [e.data for e in await c.next_events(3)] == ["a", "c", "d"]
        assert hub.hub.stats.rejected[("orders", "internal_error")] == 1
    finally:
        await c.close()


@pytest.mark.parametrize("part", ["seq", "ms"])
async def test_an_entry_id_out_of_redis_range_is_unknown_id_and_never_reaches_redis(
    start_hub: StartHub, redis_client: aioredis.Redis, part: str
) -> None:
    """Each half of an entry id is a 64-bit unsigned number in Redis: a 20-digit one past
    it is no entry id (issue 20), not a Redis error that ends the stream."""
    stream = key(f"range-{part}")
    first = await xadd(redis_client, stream, data="a")
    hub = await start(start_hub, {"orders": {"stream": stream, "history": 1}})
    later = [await xadd(redis_client, stream, data=f"b {i}") for i in range(3)]
    # All three in before the resume: else they would arrive live, behind the gap.
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == later[-1])
    ms = first.split("-")[0]
    last_id = f"{ms}-{2**64}" if part == "seq" else f"{2**64}-0"
    back = await SSEClient.connect(hub.port, "/channels/orders", {"Last-Event-ID": last_id})
    try:
        await back.read_until(lambda c: c.parser.last_id != last_id and c.events)
        assert [e.event for e in back.events] == ["ssehub-gap"]
        assert json.loads(back.events[0].data)["reason"] == "unknown_id"
        entry = await xadd(redis_client, stream, data="live")
        assert [e.id for e in await back.next_events(2)][1:] == [entry]
        assert hub.hub.stats.redis_replays["orders"] == 0
    finally:
        await back.close()
