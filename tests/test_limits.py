"""Connection limits never strand a browser: a 200 stream that says come back later."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from ssehub.http.app import BUSY_EVENT

from .conftest import StartHub
from .sseclient import SSEClient, http_request, open_stream, wait_until

SSE = {"Accept": "text/event-stream"}


async def test_eventsource_over_the_limit_gets_200_busy_event_and_close(
    start_hub: StartHub,
) -> None:
    hub = await start_hub(limits={"max_connections": 2, "busy_retry_ms": 1000})
    held = [await open_stream(hub.port, "/channels/chat", headers=SSE) for _ in range(2)]
    turned = await SSEClient.connect(hub.port, "/channels/chat", SSE)
    try:
        assert turned.status == 200
        assert turned.headers["content-type"].startswith("text/event-stream")
        await turned.read_to_eof()
        assert turned.ended_cleanly
        (busy,) = turned.events
        assert busy.event == BUSY_EVENT
        info = json.loads(busy.data)
        assert info["reason"] == "max_connections"
        assert 500 <= info["retry"] <= 1500
        assert turned.parser.retry == info["retry"]
        assert turned.parser.last_id == ""  # the client's own position is left alone
        assert hub.hub.stats.closed["limit"] == 1
    finally:
        for c in [*held, turned]:
            await c.close()


async def test_other_clients_over_the_limit_get_503_with_retry_after(start_hub: StartHub) -> None:
    hub = await start_hub(limits={"max_per_channel": 1, "busy_retry_ms": 3000})
    held = await open_stream(hub.port, "/channels/chat", headers=SSE)
    try:
        status, headers, body = await http_request(hub.port, "/channels/chat")
        assert status == 503
        assert 1 <= int(headers["retry-after"]) <= 5
        assert body == b"busy: max_per_channel\n"
    finally:
        await held.close()


async def test_per_channel_limit_counts_events_streams_too(start_hub: StartHub) -> None:
    hub = await start_hub({"a": {}, "b": {}}, limits={"max_per_channel": 1})
    held = await open_stream(hub.port, "/events?channel=a&channel=b", headers=SSE)
    try:
        status, _, _ = await http_request(hub.port, "/channels/b")
        assert status == 503
        status, _, _ = await http_request(hub.port, "/events?channel=a")
        assert status == 503
    finally:
        await held.close()


async def test_a_reconnecting_client_gets_in_once_a_slot_frees(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(limits={"max_connections": 1, "busy_retry_ms": 100})
    holder = await open_stream(hub.port, "/channels/chat", headers=SSE)

    async def reconnecting_client() -> SSEClient:
        """Behaves like EventSource: on a stream end, wait `retry` ms and try again."""
        for _ in range(200):
            client = await SSEClient.connect(hub.port, "/channels/chat", SSE)
            assert client.status == 200  # anything else would make a browser give up
            await client.read_until(lambda c: c.parser.last_id or c.events)
            if not client.events:
                return client  # in: the position marker arrived, no busy event
            assert client.events[0].event == BUSY_EVENT
            retry = client.parser.retry or 1000
            await client.close()
            await asyncio.sleep(retry / 1000)
        raise AssertionError("never got in")

    task = asyncio.create_task(reconnecting_client())
    await wait_until(lambda: hub.hub.stats.closed["limit"] >= 2)
    assert not task.done()
    await holder.close()
    client = await asyncio.wait_for(task, 10)
    try:
        await redis_client.publish("chat", "welcome")
        assert [e.data for e in await client.next_events(1)] == ["welcome"]
    finally:
        await client.close()
