"""Session ids at stream start, and ``except``: every subscriber but the named sessions."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from typing import Any

import pytest
import redis.asyncio as aioredis

from ssehub.core.ids import compact, new_session_id
from ssehub.core.messages import Rejected, parse, parse_juggernaut

from .conftest import StartHub
from .redis_server import RedisServer
from .sseclient import SSEClient, open_stream, wait_until

CHANNELS = {"chat": {"format": "json"}, "news": {"format": "json"}}


def publish(data: str, exclude: Any = None) -> str:
    message: dict[str, Any] = {"data": data}
    if exclude is not None:
        message["except"] = exclude
    return json.dumps(message)


async def close(*clients: SSEClient) -> None:
    for c in clients:
        await c.close()


# --- session ids ------------------------------------------------------------------


async def test_every_stream_starts_with_its_own_session_id(start_hub: StartHub) -> None:
    hub = await start_hub(CHANNELS)
    a = await open_stream(hub.port, "/channels/chat")
    b = await open_stream(hub.port, "/events?channel=chat&channel=news")
    try:
        assert a.session and b.session and a.session != b.session
        # First event of the stream, named, with no id: the position line follows it
        # and Last-Event-ID is what that line says.
        for c in (a, b):
            head = b"retry: 3000\n\nevent: ssehub-session\ndata: %s\n\nid: " % c.session.encode()
            assert c.body.startswith(head)
            assert c.parser.last_id == f"{hub.hub.epoch}-0"
    finally:
        await close(a, b)


async def test_session_ids_tell_nothing_about_other_sessions(start_hub: StartHub) -> None:
    """An id of ``<process prefix>.<counter>`` gave away its neighbours' (issue 20): an
    app passing a client-chosen id to ``except`` could then hide another user's events."""
    one = await start_hub(CHANNELS)
    two = await start_hub(CHANNELS)
    streams = [await open_stream(hub.port, "/channels/chat") for hub in (one, one, two)]
    try:
        ids = [c.session for c in streams]
        assert len(set(ids)) == 3
        assert all(re.fullmatch(r"[A-Za-z0-9_-]{16}", s) for s in ids)
        # Consecutive streams of one process share no prefix worth guessing from.
        assert ids[0][:8] != ids[1][:8]
    finally:
        await close(*streams)


def test_session_ids_carry_96_random_bits() -> None:
    many = [new_session_id() for _ in range(10_000)]
    assert len(set(many)) == len(many)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{16}", s) for s in many)  # 16 x 6 bits
    # Every position varies across ids: nothing is a per-process constant or a counter.
    for position in range(16):
        assert len({s[position] for s in many}) == 64


# --- except: parsing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("s1", ("s1",)), (["s1", "s2", "s1"], ("s1", "s2")), (None, ()), ([], ())],
)
def test_except_takes_one_id_or_a_list(value: Any, expected: tuple[str, ...]) -> None:
    payload = json.dumps({"data": "x", "except": value}).encode()
    assert parse("json", payload, 1000).exclude == expected
    jug = json.dumps({"channels": ["a"], "data": "x", "except": value}).encode()
    assert parse_juggernaut(jug, 1000)[1].exclude == expected


@pytest.mark.parametrize("value", [5, [1], {"a": 1}, ["x" * 65], ["s"] * 1001])
def test_a_bad_except_rejects_the_message(value: Any) -> None:
    with pytest.raises(Rejected) as err:
        parse("json", json.dumps({"data": "x", "except": value}).encode(), 100_000)
    assert err.value.reason == "bad_field"


# --- except: delivery -------------------------------------------------------------


async def test_except_skips_one_session_and_keeps_its_order(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(CHANNELS)
    author, other, mux = (
        await open_stream(hub.port, "/channels/chat"),
        await open_stream(hub.port, "/channels/chat"),
        await open_stream(hub.port, "/events?channel=chat"),
    )
    try:
        await redis_client.publish("chat", publish("before"))
        await redis_client.publish("chat", publish("mine", author.session))
        await redis_client.publish("chat", publish("after"))
        for c in (other, mux):
            assert [e.data for e in await c.next_events(3)] == ["before", "mine", "after"]
        assert [e.data for e in await author.next_events(2)] == ["before", "after"]
        # The author is still a member of its group: the next event reaches it.
        await redis_client.publish("chat", publish("next"))
        assert [e.data for e in await author.next_events(3)][-1] == "next"
    finally:
        await close(author, other, mux)


async def test_except_with_several_sessions_on_both_stream_kinds(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(CHANNELS)
    a = await open_stream(hub.port, "/channels/chat")
    b = await open_stream(hub.port, "/events?channel=chat&channel=news")
    c = await open_stream(hub.port, "/events?channel=chat&channel=news")
    d = await open_stream(hub.port, "/channels/chat")
    try:
        await redis_client.publish("chat", publish("not a, b", [a.session, b.session, "gone.1"]))
        await redis_client.publish("chat", publish("all"))
        for got in (c, d):
            assert [e.data for e in await got.next_events(2)] == ["not a, b", "all"]
        for skipped in (a, b):
            assert [e.data for e in await skipped.next_events(1)] == ["all"]
        assert len(b.events) == 1
    finally:
        await close(a, b, c, d)


async def test_except_in_the_juggernaut_format(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(CHANNELS, juggernaut={"enabled": True})
    a = await open_stream(hub.port, "/channels/chat")
    b = await open_stream(hub.port, "/channels/news")
    c = await open_stream(hub.port, "/channels/chat")
    try:
        message = {"channels": ["chat", "news"], "data": {"line": 1}, "except": a.session}
        await redis_client.publish("juggernaut", json.dumps(message))
        await redis_client.publish("juggernaut", json.dumps({"channel": "chat", "data": "2"}))
        assert [e.data for e in await c.next_events(2)] == ['{"line":1}', "2"]
        assert [e.data for e in await b.next_events(1)] == ['{"line":1}']
        assert [e.data for e in await a.next_events(1)] == ["2"]
    finally:
        await close(a, b, c)


async def test_except_works_for_a_session_on_another_node(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    one = await start_hub(CHANNELS)
    two = await start_hub(CHANNELS)
    here = await open_stream(one.port, "/channels/chat")
    author = await open_stream(two.port, "/channels/chat")
    there = await open_stream(two.port, "/channels/chat")
    try:
        await redis_client.publish("chat", publish("line", author.session))
        await redis_client.publish("chat", publish("end"))
        for c in (here, there):
            assert [e.data for e in await c.next_events(2)] == ["line", "end"]
        assert [e.data for e in await author.next_events(1)] == ["end"]
    finally:
        await close(here, author, there)


async def test_history_keeps_excepted_events_for_resumes(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(CHANNELS)
    author = await open_stream(hub.port, "/channels/chat")
    start = author.parser.last_id
    try:
        await redis_client.publish("chat", publish("mine", author.session))
        await redis_client.publish("chat", publish("end"))
        await author.next_events(1)
    finally:
        await author.close()
    # A resume is a new connection with a new session: the hub cannot know it is the
    # author's page, so the replay carries the event (README: Juggernaut parity).
    again = await open_stream(hub.port, "/channels/chat", last_id=start)
    try:
        assert again.session != author.session
        assert [e.data for e in await again.next_events(2)] == ["mine", "end"]
    finally:
        await again.close()


async def test_a_stream_still_catching_up_skips_an_event_that_excepts_it(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """The excluded stream is in the middle of a long replay (it does not read): the
    event is kept out of what it reads next, not only out of its live group."""
    hub = await start_hub({"chat": {"format": "json", "history": 200}})
    big = "x" * 60_000
    for i in range(200):  # 12 MB of history: more than the kernel's socket buffers
        await redis_client.publish("chat", publish(f"{i} {big}"))
    await wait_until(lambda: len(hub.hub.channels["chat"].history) == 200, timeout=10)
    headers = {"Last-Event-ID": f"{hub.hub.epoch}-0"}
    slow = await SSEClient.connect(hub.port, "/channels/chat", headers)
    other = await open_stream(hub.port, "/channels/chat")
    try:
        await slow.read_until(lambda c: c.session)  # its id, then it stops reading
        await wait_until(lambda: hub.hub.catching_up == 1)
        await redis_client.publish("chat", publish("not for slow", slow.session))
        await redis_client.publish("chat", publish("for all"))
        assert [e.data for e in await other.next_events(2)] == ["not for slow", "for all"]
        events = await slow.next_events(201, timeout=20)
        data = [e.data.split(" ")[0] if e.data.endswith(big) else e.data for e in events]
        assert data == [str(i) for i in range(200)] + ["for all"]
    finally:
        await close(slow, other)


async def test_an_except_published_while_the_stream_waits_for_redis_reaches_it_not(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """The page has its session id from the stream's first bytes, before the stream
    registers: until then it may wait on Redis (a new member's confirmation, a stream
    channel caught up from Redis). An event excepting it meanwhile must not reach it
    in the replay that follows (issue 19)."""
    stream = "test:except-wait"
    await redis_client.delete(stream)
    first = (await redis_client.xadd(stream, {"data": "first"})).decode()
    pipe = redis_client.pipeline(transaction=False)
    for i in range(2000):  # 8 MB: more than the kernel's socket buffers take
        pipe.xadd(stream, {"data": f"{i} " + "x" * 4000})
    await pipe.execute()
    channels = {"chat": {"format": "json"}, "orders": {"stream": stream, "history": 1}}
    hub = await start_hub(channels, wait_ready=False, limits={"max_buffer_bytes": 65536})
    await wait_until(lambda: hub.ready, timeout=10)
    # Where the page stands: now on chat, at the first entry on orders.
    last_id = f"{hub.hub.epoch}-{hub.hub.seq}~{compact(first)}"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", hub.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    page = SSEClient(reader, writer)
    request = "GET /events?channel=chat&channel=orders HTTP/1.1\r\nHost: t\r\n"
    writer.write(f"{request}Last-Event-ID: {last_id}\r\n\r\n".encode())
    try:
        await page._read_head(5)
        await page.read_until(lambda c: c.session)  # then it stops reading for a while
        await wait_until(lambda: hub.hub.stats.redis_replays["orders"] == 1, timeout=5)
        assert hub.hub.connections == 0  # still catching up from Redis, not registered
        await redis_client.publish("chat", publish("not for the page", page.session))
        await redis_client.publish("chat", publish("for all"))
        await wait_until(lambda: hub.hub.stats.received["chat"] == 2)
        events = await page.next_events(2001, timeout=20)
        assert [e.data for e in events if e.event == "chat"] == ["for all"]
        assert len([e for e in events if e.event == "orders"]) == 2000
        assert hub.hub.sessions.waiting == 0  # live now
    finally:
        await page.close()
    await wait_until(lambda: hub.hub.connections == 0)
    assert (len(hub.hub.sessions), hub.hub.sessions.waiting) == (0, 0)


async def test_sessions_of_streams_that_never_registered_are_let_go(
    start_hub: StartHub,
) -> None:
    """A stream ended while it waited (here: for a member Redis never confirms, since
    Redis is gone) leaves no session behind."""
    # Its own Redis, killed: a pause of the shared one (CLIENT PAUSE 400) could end, and
    # the member be confirmed, before a loaded machine got to look at the waiting stream.
    redis = RedisServer()
    redis.start()
    try:
        hub = await start_hub(
            {"user.*": {"redis_channel": "app:user:*"}}, redis_url=redis.url, heartbeat=0.2
        )
        redis.kill()
        await wait_until(lambda: not hub.broker.ready)
        c = await SSEClient.connect(hub.port, "/channels/user.7")
        await c.read_until(lambda c: c.session)
        assert hub.hub.sessions.waiting == 1
        await c.close()
        await wait_until(lambda: hub.hub.sessions.waiting == 0, timeout=5)
        assert len(hub.hub.sessions) == 0
    finally:
        redis.stop()
