"""POST /publish: through Redis in each channel's format, answered with what Redis said,
idempotent on demand, with specific errors; against a real Redis (and a real Cluster)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from ssehub.server import HubServer

from .conftest import StartHub
from .sseclient import SSEClient, open_stream

KEY = "k" * 24
ADMIN = {"host": "127.0.0.1", "port": 0}
CHANNELS: dict[str, Any] = {
    "chat": {},
    "prices": {"format": "json"},
    "orders": {"stream": "test:pub:orders", "stream_maxlen": 1000},
    "user.*": {"redis_channel": "app:user:*"},
}
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def publish_key(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("SSEHUB_TEST_PUBLISH_KEY", KEY)
    return {"key_env": "SSEHUB_TEST_PUBLISH_KEY"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    port: int,
    body: Any,
    headers: dict[str, str] | None = None,
    path: str = "/publish",
) -> tuple[int, Any, dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={**AUTH, **(headers or {})},
    ) as resp:
        text = await resp.text()
        try:
            answer = json.loads(text)
        except ValueError:
            answer = text
        return resp.status, answer, dict(resp.headers)


async def settled(client: SSEClient, redis: aioredis.Redis, channel: str = "chat") -> list[str]:
    """Everything ``client`` got before a marker published now (Redis keeps the order)."""
    await redis.publish(channel, "marker")
    await client.read_until(lambda c: any(e.data == "marker" for e in c.events))
    return [e.data for e in client.events if e.data != "marker"]


async def start(start_hub: StartHub, publish: dict[str, Any], **more: Any) -> HubServer:
    return await start_hub(CHANNELS, admin=ADMIN, publish=publish, **more)


async def test_publish_reaches_streams_in_each_channels_format(
    start_hub: StartHub, publish_key: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    hub = await start(start_hub, publish_key)
    chat = await open_stream(hub.port, "/channels/chat")
    prices = await open_stream(hub.port, "/channels/prices")
    member = await open_stream(hub.port, "/channels/user.42")
    try:
        status, answer, _ = await post(http, hub.admin_port, {"channel": "chat", "data": "hi"})
        assert (status, answer) == (200, {"channel": "chat", "receivers": 1})
        assert [e.data for e in await chat.next_events(1)] == ["hi"]

        body = {"channel": "prices", "data": {"EURUSD": 1.08}, "event": "quote", "id": "q1"}
        status, answer, _ = await post(http, hub.admin_port, body)
        assert (status, answer) == (200, {"channel": "prices", "receivers": 1})
        (event,) = await prices.next_events(1)
        assert (event.event, event.id, event.data) == ("quote", "q1", '{"EURUSD":1.08}')

        status, answer, _ = await post(http, hub.admin_port, {"channel": "user.42", "data": "you"})
        assert (status, answer) == (200, {"channel": "user.42", "receivers": 1})
        assert [e.data for e in await member.next_events(1)] == ["you"]
    finally:
        for client in (chat, prices, member):
            await client.close()


async def test_publish_to_a_stream_channel_answers_its_entry_id(
    start_hub: StartHub,
    publish_key: dict[str, Any],
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    await redis_client.delete("test:pub:orders")
    hub = await start(start_hub, publish_key)
    client = await open_stream(hub.port, "/channels/orders")
    try:
        body = {"channel": "orders", "data": "shipped", "event": "status", "retry": 5000}
        status, answer, _ = await post(http, hub.admin_port, body)
        assert status == 200 and set(answer) == {"channel", "id"}
        (event,) = await client.next_events(1)
        assert (event.id, event.event, event.data) == (answer["id"], "status", "shipped")
        (entry,) = await redis_client.xrange("test:pub:orders")
        assert entry == (
            answer["id"].encode(),
            {b"data": b"shipped", b"event": b"status", b"retry": b"5000"},
        )
    finally:
        await client.close()


async def test_a_batch_is_one_request_answered_in_order(
    start_hub: StartHub, publish_key: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    hub = await start(start_hub, publish_key)
    client = await open_stream(hub.port, "/events?channel=chat&channel=orders")
    try:
        batch = [
            {"channel": "chat", "data": "one"},
            {"channel": "orders", "data": "two"},
            {"channel": "chat", "data": "three"},
        ]
        status, answer, _ = await post(http, hub.admin_port, batch)
        assert status == 200
        results = answer["results"]
        assert [r["channel"] for r in results] == ["chat", "orders", "chat"]
        assert results[0]["receivers"] == 1 and "id" in results[1]
        events = await client.next_events(3)
        # In order per source (stream entries come through the stream reader, apart).
        assert [e.data for e in events if e.event == "chat"] == ["one", "three"]
        assert [e.data for e in events if e.event == "orders"] == ["two"]
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ({"channel": "nope", "data": "x"}, 404, "body.channel: unknown channel 'nope'"),
        ({"channel": "user.a.b", "data": "x"}, 404, "unknown channel"),
        ({"data": "x"}, 400, "body.channel"),
        ({"channel": "chat"}, 400, "body.data: required"),
        ({"channel": "chat", "data": 3}, 400, "body.data: the text format carries a string"),
        ({"channel": "chat", "data": "x", "event": "e"}, 400, "body.event: the text format"),
        ({"channel": "chat", "data": "x", "except": "s.1"}, 400, "body.except: the text format"),
        ({"channel": "chat", "data": "x", "colour": 1}, 400, "body.colour: unknown field"),
        ({"channel": "prices", "data": "x", "event": "a\nb"}, 400, "event contains CR, LF"),
        ({"channel": "prices", "data": "x", "retry": -1}, 400, "retry"),
        ({"channel": "orders", "data": "x", "id": "1-1"}, 400, "body.id: a stream channel's"),
        ({"channel": "orders", "data": "x", "except": "s.1"}, 400, "body.except"),
        ([{"channel": "chat", "data": "ok"}, {"channel": "x", "data": 1}], 404, "body[1].channel"),
        ([], 400, "body: 1 to 3 messages"),
        ([{"channel": "chat", "data": "x"}] * 4, 400, "body: 1 to 3 messages"),
        (b"{not json", 400, "body: not JSON"),
        ("a string", 400, "body: expected an object"),
    ],
)
async def test_a_bad_request_is_refused_whole_naming_the_field(
    start_hub: StartHub,
    publish_key: dict[str, Any],
    http: aiohttp.ClientSession,
    body: Any,
    status: int,
    names: str,
    redis_client: aioredis.Redis,
) -> None:
    hub = await start(start_hub, {**publish_key, "max_batch": 3})
    client = await open_stream(hub.port, "/channels/chat")
    try:
        got, answer, _ = await post(http, hub.admin_port, body)
        assert got == status and names in answer, answer
        assert await settled(client, redis_client) == []  # the request was refused whole
        metrics = await (await http.get(f"http://127.0.0.1:{hub.admin_port}/metrics")).text()
        result = "unknown_channel" if status == 404 else "bad_request"
        assert f'ssehub_publish_requests_total{{result="{result}"}} 1.0' in metrics
    finally:
        await client.close()


async def test_the_key_is_required_and_limits_are_enforced(
    start_hub: StartHub, publish_key: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    hub = await start(start_hub, {**publish_key, "max_body_bytes": 100})
    url = f"http://127.0.0.1:{hub.admin_port}/publish"
    body = {"channel": "chat", "data": "x"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        async with http.post(url, json=body, headers=headers) as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    status, answer, _ = await post(http, hub.admin_port, {"channel": "chat", "data": "x" * 200})
    assert status == 413 and "100 bytes" in answer
    # Not on the public listener unless publish.public says so.
    async with http.post(f"http://127.0.0.1:{hub.port}/publish", json=body, headers=AUTH) as resp:
        assert resp.status in (404, 405)


async def test_without_a_key_there_is_no_endpoint(
    start_hub: StartHub, http: aiohttp.ClientSession
) -> None:
    hub = await start_hub(CHANNELS, admin=ADMIN)
    async with http.post(f"http://127.0.0.1:{hub.admin_port}/publish", json={}) as resp:
        assert resp.status in (404, 405)


async def test_publish_public_serves_it_on_the_public_listener(
    start_hub: StartHub, publish_key: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    hub = await start_hub(CHANNELS, publish={**publish_key, "public": True})
    client = await open_stream(hub.port, "/channels/chat")
    try:
        status, answer, _ = await post(http, hub.port, {"channel": "chat", "data": "pub"})
        assert (status, answer) == (200, {"channel": "chat", "receivers": 1})
        assert [e.data for e in await client.next_events(1)] == ["pub"]
    finally:
        await client.close()


async def test_redis_away_is_503(
    start_hub: StartHub,
    publish_key: dict[str, Any],
    http: aiohttp.ClientSession,
    dead_redis_url: str,
) -> None:
    hub = await start(start_hub, publish_key, redis_url=dead_redis_url, wait_ready=False)
    status, answer, _ = await post(http, hub.admin_port, {"channel": "chat", "data": "x"})
    assert (status, answer) == (503, "redis unavailable\n")


async def test_an_idempotency_key_publishes_once_and_returns_the_first_answer(
    start_hub: StartHub,
    publish_key: dict[str, Any],
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    hub = await start(start_hub, publish_key)
    other = await start(start_hub, publish_key)  # a second node: the key is in Redis
    client = await open_stream(hub.port, "/channels/chat")
    try:
        key = {"Idempotency-Key": "order-7-shipped"}
        body = [{"channel": "chat", "data": "once"}, {"channel": "orders", "data": "once"}]
        first = await post(http, hub.admin_port, body, key)
        assert first[0] == 200 and "Idempotent-Replayed" not in first[2]
        # Ten more, at once, on both nodes: each gets the first answer, nothing is sent.
        again = await asyncio.gather(
            *(post(http, n.admin_port, body, key) for n in [hub, other] * 5)
        )
        for status, answer, headers in again:
            assert (status, answer) == (200, first[1]) and headers["Idempotent-Replayed"] == "true"
        assert await settled(client, redis_client) == ["once"]
        # The same key for another message is a conflict, not a silent replay.
        status, answer, _ = await post(http, hub.admin_port, {"channel": "chat", "data": "x"}, key)
        assert status == 422 and "Idempotency-Key" in answer
    finally:
        await client.close()


async def test_concurrent_duplicates_publish_once(
    start_hub: StartHub,
    publish_key: dict[str, Any],
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    hub = await start(start_hub, publish_key)
    other = await start(start_hub, publish_key)
    client = await open_stream(hub.port, "/channels/chat")
    try:
        key = {"Idempotency-Key": "race"}
        body = {"channel": "chat", "data": "raced"}
        answers = await asyncio.gather(
            *(post(http, n.admin_port, body, key) for n in [hub, other] * 10)
        )
        assert {(s, json.dumps(a)) for s, a, _ in answers} == {
            (200, json.dumps({"channel": "chat", "receivers": 2}))  # two nodes
        }
        assert sum("Idempotent-Replayed" not in h for _, _, h in answers) == 1
        assert await settled(client, redis_client) == ["raced"]
    finally:
        await client.close()


def test_the_idempotency_key_shares_its_channels_slot() -> None:
    from redis.crc import key_slot

    from ssehub.redis.publish import idempotency_key

    for target in (b"chat", b"{orders}:7", b"app:{x}", b"{}odd", b"a{"):
        assert key_slot(idempotency_key("k", 3, target)) == key_slot(target)


async def test_a_member_fed_by_the_control_channel_is_no_channel_to_publish_to(
    start_hub: StartHub, publish_key: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    # x.control would be fed by "ssehub:control": publishing there would be a control
    # message, so it is unknown here as it is to a stream request.
    channels = {**CHANNELS, "x.*": {"redis_channel": "ssehub:*"}}
    hub = await start_hub(channels, admin=ADMIN, publish=publish_key)
    status, answer, _ = await post(http, hub.admin_port, {"channel": "x.control", "data": "{}"})
    assert status == 404 and "unknown channel 'x.control'" in answer
    status, _, _ = await post(http, hub.admin_port, {"channel": "x.other", "data": "ok"})
    assert status == 200
