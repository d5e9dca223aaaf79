"""Several channels through one /events connection: delivery and resume."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from ssehub.hub.hub import GAP_EVENT

from .conftest import StartHub
from .sseclient import SSEClient, http_request, open_stream, wait_until


async def mux(port: int, channels: list[str], last_id: str | None = None) -> SSEClient:
    query = "&".join(f"channel={c}" for c in channels)
    return await open_stream(port, f"/events?{query}", last_id)


async def test_events_name_their_channel_and_keep_publish_order(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"a": {}, "b": {"format": "json"}, "c": {}})
    client = await mux(hub.port, ["a", "b"])
    try:
        await redis_client.publish("a", "a1")
        await redis_client.publish("b", json.dumps({"data": "b1", "event": "tick"}))
        await redis_client.publish("c", "not followed")
        await redis_client.publish("a", "a2")
        events = await client.next_events(3)
        assert [(e.event, e.data) for e in events] == [("a", "a1"), ("b:tick", "b1"), ("a", "a2")]
        ids = [int(e.id.rsplit("-", 1)[1]) for e in events]
        assert ids == sorted(ids)
        assert all(e.id.startswith(hub.hub.epoch + "-") for e in events)
    finally:
        await client.close()


async def test_same_bytes_for_clients_following_the_same_channels(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"a": {}, "b": {}})
    one = await mux(hub.port, ["a", "b"])
    two = await mux(hub.port, ["b", "a"])
    solo = await mux(hub.port, ["b"])
    try:
        for i in range(5):
            await redis_client.publish("a" if i % 2 else "b", f"x{i}")
        await one.next_events(5)
        await two.next_events(5)
        await solo.next_events(3)
        # The same bytes but for each stream's own session id.
        assert one.body.replace(one.session.encode(), b"") == two.body.replace(
            two.session.encode(), b""
        )
        assert [e.data for e in solo.events] == ["x0", "x2", "x4"]
        assert len(hub.hub.fanout.mux) == 2
    finally:
        for c in (one, two, solo):
            await c.close()


async def test_one_last_event_id_resumes_every_channel(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"a": {}, "b": {}})
    client = await mux(hub.port, ["a", "b"])
    try:
        await redis_client.publish("a", "a1")
        await redis_client.publish("b", "b1")
        events = await client.next_events(2)
    finally:
        await client.close()
    await redis_client.publish("b", "b2")
    await redis_client.publish("a", "a2")
    await redis_client.publish("b", "b3")
    # Pub/sub reaches the hub on its own connection: resume only once all five are in.
    await wait_until(lambda: hub.hub.seq == 5)
    resumed = await mux(hub.port, ["a", "b"], events[-1].id)
    try:
        assert [(e.event, e.data) for e in resumed.events] == [
            ("b", "b2"),
            ("a", "a2"),
            ("b", "b3"),
        ]
        assert resumed.parser.last_id == hub.hub.position()
    finally:
        await resumed.close()


async def test_resume_gap_is_signalled_per_channel(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"small": {"history": 1}, "big": {"history": 50}})
    client = await mux(hub.port, ["small", "big"])
    try:
        await redis_client.publish("small", "s1")
        first = (await client.next_events(1))[0]
    finally:
        await client.close()
    for i in range(3):
        await redis_client.publish("small", f"s{i + 2}")
        await redis_client.publish("big", f"b{i}")
    await wait_until(lambda: hub.hub.seq == 7)
    resumed = await mux(hub.port, ["small", "big"], first.id)
    try:
        gap = [json.loads(e.data) for e in resumed.events if e.event == GAP_EVENT]
        assert gap == [{"channel": "small", "reason": "expired", "lastEventId": first.id}]
        assert resumed.events[0].event == GAP_EVENT
        rest = [(e.event, e.data) for e in resumed.events[1:]]
        assert rest == [("big", "b0"), ("big", "b1"), ("small", "s4"), ("big", "b2")]
    finally:
        await resumed.close()


async def test_unknown_channel_in_the_list_is_404_naming_it(start_hub: StartHub) -> None:
    hub = await start_hub({"a": {}})
    status, _, body = await http_request(hub.port, "/events?channel=a&channel=nope&channel=zz")
    assert status == 404
    assert body == b"unknown channel: nope, zz\n"


async def test_no_channel_or_too_many_is_400(start_hub: StartHub) -> None:
    hub = await start_hub({"a": {}, "b": {}, "c": {}}, limits={"max_channels_per_connection": 2})
    status, _, _ = await http_request(hub.port, "/events")
    assert status == 400
    status, _, body = await http_request(hub.port, "/events?channel=a&channel=b&channel=c")
    assert status == 400
    assert b"at most 2" in body


async def test_mux_disconnect_cleans_up_groups(start_hub: StartHub) -> None:
    hub = await start_hub({"a": {}, "b": {}})
    client = await mux(hub.port, ["a", "b"])
    assert hub.hub.connections == 1
    await client.close()
    from .sseclient import wait_until

    await wait_until(lambda: hub.hub.connections == 0)
    assert hub.hub.fanout.mux == {}
    assert not hub.hub.channels["a"].mux_groups


async def test_each_channel_of_an_events_stream_rewinds_by_its_own_default(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """``/events?channel=chat&channel=prices`` replayed chat's history although only
    prices has a ``rewind``: the largest was applied to all (issue 21). ``?rewind=N``
    still asks every channel for its last N."""
    hub = await start_hub({"chat": {}, "orders": {"rewind": 1}, "prices": {"rewind": 2}})
    for i in range(3):
        for name in ("chat", "orders", "prices"):
            await redis_client.publish(name, f"{name} {i}")
    await wait_until(lambda: hub.hub.seq == 9)
    own = await open_stream(hub.port, "/events?channel=chat&channel=orders&channel=prices")
    asked = await open_stream(hub.port, "/events?channel=chat&channel=prices&rewind=1")
    try:
        assert [e.data for e in own.events] == ["prices 1", "orders 2", "prices 2"]  # hub order
        assert [e.data for e in asked.events] == ["chat 2", "prices 2"]
        await redis_client.publish("chat", "live")
        assert [e.data for e in await own.next_events(4)][3:] == ["live"]
    finally:
        await own.close()
        await asked.close()
