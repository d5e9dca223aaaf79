"""The hub end to end: real Redis, real hub on port 0, raw sockets."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct

import pytest
import redis.asyncio as aioredis

from .conftest import StartHub
from .sseclient import SSEClient, http_request, open_stream, wait_until


async def test_stream_headers_and_first_bytes(start_hub: StartHub) -> None:
    hub = await start_hub(retry_ms=2500)
    client = await SSEClient.connect(hub.port, "/channels/chat")
    try:
        assert client.status == 200
        assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert client.headers["cache-control"] == "no-cache"
        assert client.headers["x-accel-buffering"] == "no"
        assert client.headers["transfer-encoding"] == "chunked"
        await client.read_until(lambda c: c.parser.last_id)
        # The session id comes first, with no id of its own (Last-Event-ID is untouched).
        assert re.fullmatch(r"[A-Za-z0-9_-]{16}", client.session)
        assert client.body == b"retry: 2500\n\nevent: ssehub-session\ndata: %s\n\nid: %s-0\n\n" % (
            client.session.encode(),
            hub.hub.epoch.encode(),
        )
    finally:
        await client.close()


async def test_delivers_to_every_subscriber_in_publish_order(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub()
    clients = [await open_stream(hub.port, "/channels/chat") for _ in range(5)]
    try:
        for i in range(50):
            await redis_client.publish("chat", f"message {i}")
        for c in clients:
            events = await c.next_events(50)
            assert [e.data for e in events] == [f"message {i}" for i in range(50)]
            assert all(e.event == "message" for e in events)
        assert hub.hub.stats.received["chat"] == 50
        assert hub.hub.stats.delivered == 250
    finally:
        for c in clients:
            await c.close()


async def test_channels_are_isolated(start_hub: StartHub, redis_client: aioredis.Redis) -> None:
    hub = await start_hub({"a": {}, "b": {}})
    a = await open_stream(hub.port, "/channels/a")
    b = await open_stream(hub.port, "/channels/b")
    try:
        await redis_client.publish("a", "for a")
        await redis_client.publish("b", "for b")
        assert [e.data for e in await a.next_events(1)] == ["for a"]
        assert [e.data for e in await b.next_events(1)] == ["for b"]
        await redis_client.publish("b", "b again")
        await b.next_events(2)
        assert len(a.events) == 1
    finally:
        await a.close()
        await b.close()


async def test_redis_channel_mapping(start_hub: StartHub, redis_client: aioredis.Redis) -> None:
    hub = await start_hub({"news": {"redis_channel": "site:news"}})
    client = await open_stream(hub.port, "/channels/news")
    try:
        await redis_client.publish("news", "wrong channel")
        await redis_client.publish("site:news", "right channel")
        events = await client.next_events(1)
        assert [e.data for e in events] == ["right channel"]
    finally:
        await client.close()


async def test_multiline_payloads_arrive_byte_for_byte(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub()
    client = await open_stream(hub.port, "/channels/chat")
    payloads = [
        "one\ntwo",
        "crlf\r\nline",
        "lone\rcr",
        "trailing\n",
        "",
        "\u010de\u0161tina \U0001f680",
    ]
    try:
        for p in payloads:
            await redis_client.publish("chat", p.encode())
        events = await client.next_events(len(payloads))
        assert [e.data for e in events] == [
            p.replace("\r\n", "\n").replace("\r", "\n") for p in payloads
        ]
        e = hub.hub.epoch
        assert (
            client.body
            == (
                f"retry: 3000\n\nevent: ssehub-session\ndata: {client.session}\n\nid: {e}-0\n\n"
                f"id: {e}-1\ndata: one\ndata: two\n\n"
                f"id: {e}-2\ndata: crlf\ndata: line\n\n"
                f"id: {e}-3\ndata: lone\ndata: cr\n\n"
                f"id: {e}-4\ndata: trailing\ndata: \n\n"
                f"id: {e}-5\ndata: \n\n"
                f"id: {e}-6\ndata: \u010de\u0161tina \U0001f680\n\n"
            ).encode()
        )
    finally:
        await client.close()


async def test_invalid_utf8_is_dropped_counted_and_the_next_message_delivered(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub()
    client = await open_stream(hub.port, "/channels/chat")
    try:
        await redis_client.publish("chat", b"bad \xff\xfe bytes")
        await redis_client.publish("chat", "good")
        events = await client.next_events(1)
        assert [e.data for e in events] == ["good"]
        assert hub.hub.stats.rejected[("chat", "invalid_utf8")] == 1
    finally:
        await client.close()


async def test_oversized_message_is_rejected(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(limits={"max_message_bytes": 100})
    client = await open_stream(hub.port, "/channels/chat")
    try:
        await redis_client.publish("chat", "x" * 101)
        await redis_client.publish("chat", "y" * 100)
        events = await client.next_events(1)
        assert [e.data for e in events] == ["y" * 100]
        assert hub.hub.stats.rejected[("chat", "too_large")] == 1
    finally:
        await client.close()


async def test_heartbeat_comments_on_idle_streams(start_hub: StartHub) -> None:
    hub = await start_hub(heartbeat=0.1)
    client = await open_stream(hub.port, "/channels/chat")
    try:
        await client.read_until(lambda c: len(c.parser.comments) >= 3, timeout=5)
        assert client.events == []
    finally:
        await client.close()


async def test_unknown_channel_is_404(start_hub: StartHub) -> None:
    hub = await start_hub()
    status, _, body = await http_request(hub.port, "/channels/nope")
    assert status == 404
    assert b"unknown channel: nope" in body


async def test_a_404_echoes_at_most_200_characters_of_the_names(start_hub: StartHub) -> None:
    hub = await start_hub()
    status, _, body = await http_request(hub.port, "/channels/" + "n" * 5000)
    assert (status, body) == (404, b"unknown channel: " + b"n" * 200 + b"...\n")
    many = "&".join(f"channel={'m' * 150}{i}" for i in range(30))
    status, _, body = await http_request(hub.port, f"/events?{many}")
    assert status == 404 and len(body) == len("unknown channel: ...\n") + 200


async def test_every_response_says_nosniff_and_names_no_version(start_hub: StartHub) -> None:
    hub = await start_hub(
        {"chat": {}, "room.*": {"presence": True}},
        admin={"host": "127.0.0.1", "port": 0},
        presence={"public": True},
        cors={"allow_origins": ["https://app.example"]},
    )
    answers = [
        await http_request(hub.port, path, method=method, headers=headers)
        for path, method, headers in [
            ("/channels/chat", "HEAD", None),
            ("/channels/nope", "GET", None),
            ("/nowhere", "GET", None),
            ("/channels/chat", "POST", None),
            ("/channels/chat?rewind=x", "GET", None),
            ("/healthz", "GET", None),
            ("/readyz", "GET", None),
            ("/", "GET", None),
            ("/channels/room.1/presence", "GET", None),
            (
                "/channels/chat",
                "OPTIONS",
                {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
            ),
        ]
    ]
    answers += [
        await http_request(hub.admin_port, path) for path in ("/metrics", "/healthz", "/nowhere")
    ]
    stream = await open_stream(hub.port, "/channels/chat")
    await stream.close()
    # aiohttp's own answer to a request it cannot parse, before any route.
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        writer.write(b"GET /channels/chat HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n")
        head = (await asyncio.wait_for(reader.read(), 5)).partition(b"\r\n\r\n")[0]
    finally:
        writer.close()
    lines = head.decode().split("\r\n")
    assert lines[0].split()[1] == "400"
    unparsed = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    heads = [headers for _, headers, _ in answers] + [stream.headers, unparsed]
    assert {s for s, _, _ in answers} >= {200, 204, 400, 404, 405}
    for headers in heads:
        assert headers["x-content-type-options"] == "nosniff", headers
        assert headers["server"] == "ssehub", headers


async def test_traversal_and_encoded_slash_are_404(start_hub: StartHub) -> None:
    hub = await start_hub()
    for path in ["/channels/..%2Fchat", "/channels/chat%2F", "/channels/../channels/x"]:
        status, _, _ = await http_request(hub.port, path)
        assert status == 404, path


async def test_other_methods_are_405(start_hub: StartHub) -> None:
    hub = await start_hub()
    for method in ["POST", "PUT", "DELETE", "PATCH"]:
        status, headers, _ = await http_request(hub.port, "/channels/chat", method=method)
        assert status == 405, method
        assert "GET" in headers["allow"]


async def test_head_answers_headers_without_subscribing(start_hub: StartHub) -> None:
    hub = await start_hub()
    status, headers, _ = await http_request(hub.port, "/channels/chat", method="HEAD")
    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert hub.hub.connections == 0


async def test_readyz_503_without_redis(start_hub: StartHub, dead_redis_url: str) -> None:
    hub = await start_hub(redis_url=dead_redis_url, wait_ready=False)
    status, _, body = await http_request(hub.port, "/readyz")
    assert status == 503
    assert b"not ready" in body
    status, _, _ = await http_request(hub.port, "/healthz")
    assert status == 200


async def test_readyz_200_with_redis(start_hub: StartHub) -> None:
    hub = await start_hub()
    status, _, body = await http_request(hub.port, "/readyz")
    assert (status, body) == (200, b"ready\n")


async def test_disconnect_removes_subscriber_at_once(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub()
    survivor = await open_stream(hub.port, "/channels/chat")
    try:
        tasks_before = asyncio.all_tasks()
        clients = [await open_stream(hub.port, "/channels/chat") for _ in range(10)]
        await wait_until(lambda: hub.hub.connections == 11)
        for c in clients:
            await c.close()
        await wait_until(lambda: hub.hub.connections == 1, timeout=2)
        assert hub.hub.stats.closed["client_gone"] == 10
        assert len(hub.hub.channels["chat"]) == 1
        # Their handler tasks ended too.
        await wait_until(lambda: asyncio.all_tasks() <= tasks_before, timeout=2)
        # Publishing afterwards touches no dead transport: the flush that reaches the
        # survivor writes to it alone.
        await redis_client.publish("chat", "after")
        assert [e.data for e in await survivor.next_events(1)] == ["after"]
        assert hub.hub.stats.delivered == 1
    finally:
        await survivor.close()


async def test_one_redis_connection_for_many_subscribers(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"a": {}, "b": {}, "c": {}})
    before = await redis_client.pubsub_numsub("a", "b", "c")
    clients = [await open_stream(hub.port, f"/channels/{ch}") for ch in "abc" for _ in range(5)]
    try:
        after = await redis_client.pubsub_numsub("a", "b", "c")
        assert after == before == [(b"a", 1), (b"b", 1), (b"c", 1)]
    finally:
        for c in clients:
            await c.close()


async def test_http10_client_gets_an_unchunked_stream(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub()
    client = await open_stream(hub.port, "/channels/chat", version="1.0")
    try:
        assert "transfer-encoding" not in client.headers
        await redis_client.publish("chat", "plain")
        await client.next_events(1)
        e = hub.hub.epoch.encode()
        head = b"retry: 3000\n\nevent: ssehub-session\ndata: %s\n\n" % client.session.encode()
        assert client.body == head + b"id: %s-0\n\nid: %s-1\ndata: plain\n\n" % (e, e)
    finally:
        await client.close()


async def test_shutdown_ends_streams_cleanly(start_hub: StartHub) -> None:
    hub = await start_hub()
    client = await open_stream(hub.port, "/channels/chat")
    try:
        await hub.stop()
        await client.read_to_eof(timeout=5)
        assert client.ended_cleanly
    finally:
        await client.close()
    assert hub.hub.stats.closed["shutdown"] == 1


async def test_responses_say_connection_close(start_hub: StartHub) -> None:
    # No keep-alive timer per connection: the hub closes after each response and
    # must announce it, so keep-alive clients never reuse a closing socket.
    hub = await start_hub()
    for path in ["/healthz", "/readyz", "/channels/nope"]:
        _, headers, _ = await http_request(hub.port, path)
        assert headers["connection"] == "close", path


async def test_a_client_leaving_mid_resume_from_redis_is_no_error(
    start_hub: StartHub, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes its socket while its stream is caught up from Redis (its
    Last-Event-ID older than the hub's memory) has left: nothing is logged as an error,
    and the hub goes on serving others."""
    stream = "test:leaving"
    await redis_client.delete(stream)
    hub = await start_hub({"orders": {"stream": stream, "history": 2}}, wait_ready=False)
    await wait_until(lambda: hub.ready, timeout=10)
    pipe = redis_client.pipeline(transaction=False)
    for i in range(3000):  # ~3 MB to replay: far more than socket buffers hold
        pipe.xadd(stream, {"data": f"{i} " + "x" * 1000})
    ids = [m.decode() for m in await pipe.execute()]
    await wait_until(lambda: hub.hub.channels["orders"].stream_pos == ids[-1], timeout=10)
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", hub.port))
        await loop.sock_sendall(
            sock,
            b"GET /channels/orders HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
            b"Last-Event-ID: " + ids[0].encode() + b"\r\n\r\n",
        )
        got = b""
        while ids[5].encode() not in got:  # the resume from Redis is under way
            got += await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
        # Unread bytes in its receive buffer: the close is a reset, at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await wait_until(lambda: hub.hub.channels["orders"].holds == 0, timeout=5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]
    back = await SSEClient.connect(hub.port, "/channels/orders", {"Last-Event-ID": ids[-3]})
    try:
        assert [e.id for e in await back.next_events(2)] == ids[-2:]
    finally:
        await back.close()
