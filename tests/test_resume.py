"""Ids, history and Last-Event-ID resume, end to end."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import redis.asyncio as aioredis

from ssehub.core.history import AT
from ssehub.hub.hub import GAP_EVENT

from .conftest import StartHub
from .sseclient import SSEClient, open_stream, wait_until


async def publish_and_collect(
    port: int, redis_client: aioredis.Redis, channel: str, count: int
) -> list[str]:
    """Publish ``count`` messages and return the ids a live client saw."""
    client = await open_stream(port, f"/channels/{channel}")
    try:
        for i in range(count):
            await redis_client.publish(channel, f"m{i}")
        events = await client.next_events(count)
        return [e.id for e in events]
    finally:
        await client.close()


def gaps(client: SSEClient) -> list[dict[str, str]]:
    return [json.loads(e.data) for e in client.events if e.event == GAP_EVENT]


async def test_hub_ids_increase_and_carry_the_run_epoch(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub()
    ids = await publish_and_collect(hub.port, redis_client, "chat", 5)
    assert ids == [f"{hub.hub.epoch}-{n}" for n in range(1, 6)]


@pytest.mark.parametrize("position", range(0, 10))
async def test_resume_from_each_position_of_the_history(
    start_hub: StartHub, redis_client: aioredis.Redis, position: int
) -> None:
    hub = await start_hub({"chat": {"history": 10}})
    ids = await publish_and_collect(hub.port, redis_client, "chat", 10)
    last = f"{hub.hub.epoch}-0" if position == 0 else ids[position - 1]
    client = await open_stream(hub.port, "/channels/chat", last)
    try:
        assert [e.data for e in client.events] == [f"m{i}" for i in range(position, 10)]
        assert [e.id for e in client.events] == ids[position:]
        assert gaps(client) == []
        # ...then the live stream follows without a gap.
        await redis_client.publish("chat", "live")
        events = await client.next_events(10 - position + 1)
        assert events[-1].data == "live"
    finally:
        await client.close()
    assert hub.hub.stats.replays["chat"] == (1 if position < 10 else 0)


async def test_resume_after_the_history_wrapped_signals_the_gap_first(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"chat": {"history": 3}})
    ids = await publish_and_collect(hub.port, redis_client, "chat", 8)
    client = await open_stream(hub.port, "/channels/chat", ids[1])  # had m0, m1
    try:
        assert client.events[0].event == GAP_EVENT
        assert gaps(client) == [{"channel": "chat", "reason": "expired", "lastEventId": ids[1]}]
        assert [e.data for e in client.events[1:]] == ["m5", "m6", "m7"]
    finally:
        await client.close()


async def test_resume_at_the_newest_event_replays_nothing_even_without_history(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"chat": {"history": 0}})
    ids = await publish_and_collect(hub.port, redis_client, "chat", 3)
    client = await open_stream(hub.port, "/channels/chat", ids[-1])
    try:
        assert client.events == []
    finally:
        await client.close()
    missed = await open_stream(hub.port, "/channels/chat", ids[0])
    try:
        assert gaps(missed)[0]["reason"] == "expired"
    finally:
        await missed.close()


@pytest.mark.parametrize(
    "last_id",
    ["garbage", "0-1", "zzzzzzzz-1", "{epoch}-999999", "{epoch}-x"],
)
async def test_unknown_or_foreign_id_is_signalled_and_nothing_replayed(
    start_hub: StartHub, redis_client: aioredis.Redis, last_id: str
) -> None:
    hub = await start_hub()
    await publish_and_collect(hub.port, redis_client, "chat", 3)
    last_id = last_id.format(epoch=hub.hub.epoch)
    client = await open_stream(hub.port, "/channels/chat", last_id)
    try:
        assert gaps(client) == [{"channel": "chat", "reason": "unknown_id", "lastEventId": last_id}]
        assert len(client.events) == 1
        # The position marker lets the next reconnect resume from here.
        assert client.parser.last_id == hub.hub.position()
    finally:
        await client.close()


async def test_ids_from_an_earlier_run_are_unknown(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    first = await start_hub()
    old_ids = await publish_and_collect(first.port, redis_client, "chat", 3)
    await first.stop()
    second = await start_hub()
    await publish_and_collect(second.port, redis_client, "chat", 3)
    assert first.hub.epoch != second.hub.epoch
    client = await open_stream(second.port, "/channels/chat", old_ids[0])
    try:
        assert gaps(client)[0]["reason"] == "unknown_id"
    finally:
        await client.close()


async def test_last_event_id_query_parameter_and_header_precedence(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub()
    ids = await publish_and_collect(hub.port, redis_client, "chat", 4)
    client = await open_stream(hub.port, f"/channels/chat?lastEventId={ids[1]}")
    try:
        assert [e.data for e in client.events] == ["m2", "m3"]
    finally:
        await client.close()
    client = await open_stream(hub.port, f"/channels/chat?lastEventId={ids[0]}", ids[2])
    try:
        assert [e.data for e in client.events] == ["m3"]
    finally:
        await client.close()


def joined_at(client: SSEClient) -> int:
    """The hub sequence number in the stream's position marker (an id-only block):
    events up to it came as the replay, later ones live."""
    match = re.search(rb"(?:^|\n)id: [^\n]*-(\d+)\n\n", client.body)
    assert match, client.body[:200]
    return int(match.group(1))


async def test_messages_published_during_replay_arrive_once_in_order(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    total = 400
    hub = await start_hub({"chat": {"history": 1000}})
    await redis_client.publish("chat", "m0")
    await wait_until(lambda: hub.hub.seq == 1)
    first_id = hub.hub.position()
    clients: list[SSEClient] = []

    async def publisher() -> None:
        for batch, start in enumerate(range(1, total, 20)):
            # Batches and resumes take turns (two batches a resume), so that they
            # overlap on any machine: every resume has more batches after it.
            await wait_until(lambda: len(clients) >= (batch + 1) // 2, timeout=10)  # noqa: B023
            pipe = redis_client.pipeline(transaction=False)
            for i in range(start, min(start + 20, total)):
                pipe.publish("chat", f"m{i}")
            await pipe.execute()

    task = asyncio.create_task(publisher())
    try:
        for k in range(10):
            # ...and every resume but the first has events to replay.
            await wait_until(lambda: hub.hub.seq > 40 * k, timeout=10)  # noqa: B023
            clients.append(await open_stream(hub.port, "/channels/chat", first_id))
        await task
        for client in clients:
            events = await client.next_events(total - 1, timeout=10)
            assert [e.data for e in events] == [f"m{i}" for i in range(1, total)]
            assert gaps(client) == []
        # The overlap happened: each client got events live after its resume, and all
        # but the first a replay before it (m0 is sequence number 1).
        joined = [joined_at(client) for client in clients]
        assert joined[0] < total and all(1 < n < total for n in joined[1:]), joined
    finally:
        task.cancel()
        for client in clients:
            await client.close()


async def test_publisher_given_ids_are_sent_and_resumable(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"feed": {"format": "json"}})
    live = await open_stream(hub.port, "/channels/feed")
    try:
        for i in range(3):
            await redis_client.publish("feed", json.dumps({"data": f"d{i}", "id": f"order-{i}"}))
        events = await live.next_events(3)
        assert [e.id for e in events] == ["order-0", "order-1", "order-2"]
    finally:
        await live.close()
    client = await open_stream(hub.port, "/channels/feed", "order-0")
    try:
        assert [e.data for e in client.events] == ["d1", "d2"]
    finally:
        await client.close()


async def test_history_age_limit(start_hub: StartHub, redis_client: aioredis.Redis) -> None:
    hub = await start_hub({"chat": {"history": 100, "history_ttl": 0.2}})
    ids = await publish_and_collect(hub.port, redis_client, "chat", 2)
    history = hub.hub.channels["chat"].history
    newest = list(history.after(0))[-1][AT]
    # Only wait for the events to age: the hub itself must drop them when asked.
    await wait_until(lambda: time.monotonic() - newest > 0.2, timeout=3)
    client = await open_stream(hub.port, "/channels/chat", ids[0])
    try:
        assert gaps(client) == [{"channel": "chat", "reason": "expired", "lastEventId": ids[0]}]
        assert [e.event for e in client.events] == [GAP_EVENT]
    finally:
        await client.close()
    assert len(history) == 0


async def test_oversized_or_malformed_last_event_id_is_400(start_hub: StartHub) -> None:
    hub = await start_hub()
    for value in ["x" * 257]:
        client = await SSEClient.connect(hub.port, "/channels/chat", {"Last-Event-ID": value})
        try:
            assert client.status == 400
        finally:
            await client.close()
    client = await SSEClient.connect(hub.port, "/channels/chat?lastEventId=a%0Ab")
    try:
        assert client.status == 400
    finally:
        await client.close()


async def test_epochs_are_unique_per_process_even_within_one_millisecond(
    start_hub: StartHub, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two hubs started in the same millisecond (on two nodes, say): neither takes the
    other's pub/sub ids for its own."""
    monkeypatch.setattr("ssehub.hub.hub.time.time_ns", lambda: 1_796_000_000_000_000_000)
    one = await start_hub()
    two = await start_hub()
    assert one.hub.epoch != two.hub.epoch
    assert one.hub.epoch[:8] == two.hub.epoch[:8]  # the same millisecond
    ids = await publish_and_collect(one.port, redis_client, "chat", 1)
    # Two takes the message in on its own connection: in before the resume, not live
    # behind it (the test reads only what the resume itself sent).
    await wait_until(lambda: two.hub.seq == 1)
    client = await open_stream(two.port, "/channels/chat", ids[0])
    try:
        assert [json.loads(e.data)["reason"] for e in client.events] == ["unknown_id"]
    finally:
        await client.close()
