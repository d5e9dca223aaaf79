"""Session ids at stream start, and ``except``: every subscriber but the named sessions."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import redis.asyncio as aioredis

from ssehub.core.ids import SessionIds
from ssehub.core.messages import Rejected, parse, parse_juggernaut

from .conftest import StartHub
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


async def test_session_ids_differ_across_hubs_and_runs(start_hub: StartHub) -> None:
    one = await start_hub(CHANNELS)
    two = await start_hub(CHANNELS)
    a = await open_stream(one.port, "/channels/chat")
    b = await open_stream(two.port, "/channels/chat")
    try:
        # Both are each hub's first stream: only the per-process prefix tells them apart.
        assert a.session.split(".")[1] == b.session.split(".")[1] == "1"
        assert a.session != b.session
    finally:
        await close(a, b)


def test_session_ids_are_compact_and_unique() -> None:
    ids = SessionIds()
    many = [ids.new() for _ in range(10_000)]
    assert len(set(many)) == len(many)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{8}\.[0-9a-z]{1,3}", s) for s in many)
    assert SessionIds().prefix != ids.prefix


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
