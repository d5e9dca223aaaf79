"""Publisher formats end to end: json events and Juggernaut publishers."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from .conftest import StartHub
from .sseclient import open_stream


async def test_json_event_id_and_retry_reach_the_client(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"feed": {"format": "json"}})
    client = await open_stream(hub.port, "/channels/feed")
    try:
        await redis_client.publish(
            "feed", json.dumps({"data": {"price": 3}, "event": "quote", "id": "q-1", "retry": 5000})
        )
        await redis_client.publish("feed", json.dumps({"data": "plain"}))
        events = await client.next_events(2)
        assert (events[0].event, events[0].data, events[0].id, events[0].retry) == (
            "quote",
            '{"price":3}',
            "q-1",
            5000,
        )
        assert (events[1].event, events[1].data) == ("message", "plain")
        assert client.body.endswith(
            b'id: q-1\nevent: quote\nretry: 5000\ndata: {"price":3}\n\n'
            b"id: %s-2\ndata: plain\n\n" % hub.hub.epoch.encode()
        )
    finally:
        await client.close()


async def test_each_rejection_is_counted_and_the_next_message_delivered(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"feed": {"format": "json"}, "other": {}})
    client = await open_stream(hub.port, "/channels/feed")
    other = await open_stream(hub.port, "/channels/other")
    bad = [
        b"{broken json",
        b'["not", "an object"]',
        b'{"data": "x", "id": "1\\n\\ndata: injected"}',
        b'{"data": "x", "event": "a\\rb"}',
        b'{"data": "x", "unknown": 1}',
        b'{"data": "x", "retry": -5}',
        b'{"data": "\xff"}',
    ]
    try:
        for payload in bad:
            await redis_client.publish("feed", payload)
            await redis_client.publish("feed", json.dumps({"data": "good"}))
        await redis_client.publish("other", "unaffected")
        events = await client.next_events(len(bad))
        assert [e.data for e in events] == ["good"] * len(bad)
        assert b"injected" not in client.body
        assert [e.data for e in await other.next_events(1)] == ["unaffected"]
        rejected = hub.hub.stats.rejected
        assert rejected[("feed", "invalid_json")] == 2
        assert rejected[("feed", "bad_field")] == 4
        assert rejected[("feed", "invalid_utf8")] == 1
    finally:
        await client.close()
        await other.close()


async def test_juggernaut_message_to_one_and_to_several_channels(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"a": {}, "b": {}}, juggernaut={"enabled": True})
    a = await open_stream(hub.port, "/channels/a")
    b = await open_stream(hub.port, "/channels/b")
    try:
        await redis_client.publish("juggernaut", json.dumps({"channel": "a", "data": "only a"}))
        await redis_client.publish(
            "juggernaut",
            json.dumps({"channels": ["a", "b", "unconfigured"], "data": {"n": 1}}),
        )
        await redis_client.publish("juggernaut", b"not json")
        assert [e.data for e in await a.next_events(2)] == ["only a", '{"n":1}']
        assert [e.data for e in await b.next_events(1)] == ['{"n":1}']
        rejected = hub.hub.stats.rejected
        assert rejected[("juggernaut", "unknown_channel")] == 1
        assert rejected[("juggernaut", "invalid_json")] == 1
    finally:
        await a.close()
        await b.close()


async def test_juggernaut_off_by_default(start_hub: StartHub) -> None:
    hub = await start_hub({"a": {}})
    assert "juggernaut" not in hub.broker.channels
