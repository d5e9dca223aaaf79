"""Publishers cannot break delivery: odd JSON is rejected (counted, one log line) and
never stops the next message, or the other channels of a Juggernaut message."""

from __future__ import annotations

import json
import logging

import pytest
import redis.asyncio as aioredis

from ssehub.core.messages import Event, Rejected, parse, parse_juggernaut

from .conftest import StartHub
from .logcheck import records_with
from .sseclient import open_stream, wait_until

MAX = 1000

# JSON can spell lone surrogates, which UTF-8 (and so the wire) cannot carry.
LONE_SURROGATES = [
    rb'{"data": "\ud800"}',
    rb'{"data": "x\udfffy"}',
    rb'{"data": "x", "event": "\udc00"}',
    rb'{"data": "x", "id": "a\ud800"}',
    rb'{"data": {"k\udbff": 1}}',
    rb'{"data": ["\ude00"]}',
]


@pytest.mark.parametrize("payload", LONE_SURROGATES)
def test_lone_surrogates_are_invalid_utf8(payload: bytes) -> None:
    with pytest.raises(Rejected) as info:
        parse("json", payload, MAX)
    assert info.value.reason == "invalid_utf8"


def test_lone_surrogates_in_juggernaut_messages_are_invalid_utf8() -> None:
    payloads = [rb'{"channel": "a", "data": "\ud800"}', rb'{"channels": ["\ud800"], "data": 1}']
    for payload in payloads:
        with pytest.raises(Rejected) as info:
            parse_juggernaut(payload, MAX)
        assert info.value.reason == "invalid_utf8"


def test_surrogate_pairs_are_fine() -> None:
    # An escaped emoji is a valid pair, not a lone surrogate.
    assert parse("json", rb'{"data": "\ud83d\ude00", "id": "\ud83d\ude00"}', MAX) == Event(
        data="\U0001f600", id="\U0001f600"
    )


def test_empty_publisher_id_is_absent() -> None:
    assert parse("json", b'{"data": "x", "id": ""}', MAX) == Event(data="x")


async def test_lone_surrogates_are_rejected_counted_and_logged_once_each(
    start_hub: StartHub, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start_hub({"feed": {"format": "json"}})
    client = await open_stream(hub.port, "/channels/feed")
    try:
        for payload in LONE_SURROGATES:
            await redis_client.publish("feed", payload)
        await redis_client.publish("feed", json.dumps({"data": "good"}))
        events = await client.next_events(1)
        assert [e.data for e in events] == ["good"]
        assert hub.hub.stats.rejected[("feed", "invalid_utf8")] == len(LONE_SURROGATES)
        rejected = records_with(caplog, "message rejected")
        assert [r["reason"] for r in rejected] == ["invalid_utf8"] * len(LONE_SURROGATES)
        assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    finally:
        await client.close()


async def test_juggernaut_lone_surrogate_is_rejected_and_the_next_message_reaches_all(
    start_hub: StartHub, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start_hub({"a": {}, "b": {}}, juggernaut={"enabled": True})
    a = await open_stream(hub.port, "/channels/a")
    b = await open_stream(hub.port, "/channels/b")
    try:
        await redis_client.publish("juggernaut", rb'{"channels": ["a", "b"], "data": "\ud800"}')
        await redis_client.publish("juggernaut", json.dumps({"channels": ["a", "b"], "data": "ok"}))
        assert [e.data for e in await a.next_events(1)] == ["ok"]
        assert [e.data for e in await b.next_events(1)] == ["ok"]
        assert hub.hub.stats.rejected[("juggernaut", "invalid_utf8")] == 1
        assert len(records_with(caplog, "message rejected")) == 1
        assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    finally:
        await a.close()
        await b.close()


async def test_juggernaut_delivers_to_every_valid_channel_whatever_happens_to_one(
    start_hub: StartHub, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = await start_hub({"a": {}, "b": {}, "c": {}}, juggernaut={"enabled": True})
    ingest = hub.hub.ingest._ingest

    def failing_on_b(channel: object, event: Event) -> None:
        if getattr(channel, "name", None) == "b":
            raise RuntimeError("b is broken")
        ingest(channel, event)  # type: ignore[arg-type]

    monkeypatch.setattr(hub.hub.ingest, "_ingest", failing_on_b)
    a = await open_stream(hub.port, "/channels/a")
    c = await open_stream(hub.port, "/channels/c")
    try:
        message = {"channels": ["a", "nope", "b", "c"], "data": "to all"}
        await redis_client.publish("juggernaut", json.dumps(message))
        assert [e.data for e in await a.next_events(1)] == ["to all"]
        assert [e.data for e in await c.next_events(1)] == ["to all"]
        rejected = hub.hub.stats.rejected
        assert rejected[("b", "internal_error")] == 1
        assert rejected[("juggernaut", "unknown_channel")] == 1
    finally:
        await a.close()
        await c.close()


async def test_empty_publisher_id_gets_a_hub_id_that_resumes(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"feed": {"format": "json"}})
    client = await open_stream(hub.port, "/channels/feed")
    try:
        await redis_client.publish("feed", json.dumps({"data": "first", "id": ""}))
        (event,) = await client.next_events(1)
        assert event.id == f"{hub.hub.epoch}-{hub.hub.seq}"
        await redis_client.publish("feed", json.dumps({"data": "second", "id": ""}))
        await wait_until(lambda: hub.hub.stats.received["feed"] == 2)
    finally:
        await client.close()
    # Its reconnect carries that id: what came after it is replayed.
    again = await open_stream(hub.port, "/channels/feed", last_id=event.id)
    try:
        assert [e.data for e in await again.next_events(1)] == ["second"]
    finally:
        await again.close()


# --- deeply nested JSON --------------------------------------------------------------

# 10 KB of nesting: past Python's recursion limit in the json module (issue 19).
DEEP = b"[" * 5000
DEEP_FIELD = b'{"data": ' + b"[" * 5000 + b"]" * 5000 + b"}"


@pytest.mark.parametrize(
    ("fmt", "payload"),
    [("json", DEEP), ("json", DEEP_FIELD), ("juggernaut", b'{"channel": "a", "data": ' + DEEP)],
)
def test_deep_nesting_is_invalid_json(fmt: str, payload: bytes) -> None:
    with pytest.raises(Rejected) as err:
        if fmt == "juggernaut":
            parse_juggernaut(payload, 100_000)
        else:
            parse(fmt, payload, 100_000)
    assert err.value.reason == "invalid_json"


async def test_deeply_nested_json_is_rejected_counted_and_the_next_message_delivered(
    start_hub: StartHub, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start_hub({"feed": {"format": "json"}})
    client = await open_stream(hub.port, "/channels/feed")
    try:
        await redis_client.publish("feed", DEEP)
        await redis_client.publish("feed", DEEP_FIELD)
        await redis_client.publish("feed", json.dumps({"data": "good"}))
        assert [e.data for e in await client.next_events(1)] == ["good"]
        assert hub.hub.stats.rejected[("feed", "invalid_json")] == 2
        assert len(records_with(caplog, "message rejected")) == 2
        assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    finally:
        await client.close()


@pytest.mark.parametrize(
    "payload",
    [b'{"data": NaN}', b'{"data": [Infinity]}', b'{"data": {"x": -Infinity}}', b'{"data": 1e999}'],
)
def test_json_that_is_not_rfc_8259_is_invalid_json(payload: bytes) -> None:
    """A browser's JSON.parse reads none of these back from the event's data."""
    with pytest.raises(Rejected) as err:
        parse("json", payload, MAX)
    assert err.value.reason == "invalid_json"
    with pytest.raises(Rejected):
        parse_juggernaut(payload.replace(b"{", b'{"channel": "a", ', 1), MAX)
