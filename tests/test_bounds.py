"""Memory bounds a client cannot bypass: history bytes and age, replay, /events groups."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ssehub.config import ChannelConfig, Limits
from ssehub.core.history import SEQ, Budget, History
from ssehub.core.history import entry as new_entry
from ssehub.http.app import BUSY_EVENT
from ssehub.http.auth import CLAIM
from ssehub.hub.hub import GAP_EVENT

from .conftest import StartHub
from .sseclient import SSEClient, http_request, open_stream, wait_until
from .test_auth import SECRET, token
from .test_metrics import ADMIN, one, scrape
from .test_slow_clients import rss


def sized(seq: int, size: int) -> tuple[int, str, bytes, float]:
    return new_entry(seq, f"e-{seq}", b"x" * size)


# --- history bytes ------------------------------------------------------------------


def test_history_byte_bound_evicts_oldest_first_and_counts() -> None:
    h = History(100, max_bytes=1000, name="chat")
    for seq in range(1, 11):
        h.append(sized(seq, 300), publisher_id=False)
    assert [e[SEQ] for e in h.after(0)] == [8, 9, 10]
    assert h.bytes == 900
    assert h.evicted_seq == 7
    assert h.budget.evicted == {("chat", "bytes"): 7}


def test_an_event_larger_than_the_byte_bound_is_not_kept() -> None:
    h = History(100, max_bytes=100, name="chat")
    h.append(sized(1, 50), publisher_id=False)
    h.append(sized(2, 101), publisher_id=False)
    assert len(h) == 0 and h.bytes == 0
    assert h.evicted_seq == 2


def test_hub_budget_evicts_the_hub_wide_oldest_whatever_the_channel() -> None:
    budget = Budget(limit=1000)
    a = History(100, budget=budget, name="a")
    b = History(100, budget=budget, name="b")
    a.append(sized(1, 400), publisher_id=False)
    b.append(sized(2, 400), publisher_id=False)
    a.append(sized(3, 100), publisher_id=False)
    b.append(sized(4, 400), publisher_id=False)  # 1300 > 1000: seq 1 (a) goes
    assert [e[SEQ] for e in a.after(0)] == [3]
    assert [e[SEQ] for e in b.after(0)] == [2, 4]
    assert budget.bytes == 900 == a.bytes + b.bytes
    assert budget.evicted == {("a", "hub"): 1}
    b.append(sized(5, 400), publisher_id=False)  # then seq 2 (b)
    b.append(sized(6, 200), publisher_id=False)  # then seq 3 (a)
    assert [e[SEQ] for e in a.after(0)] == []
    assert [e[SEQ] for e in b.after(0)] == [4, 5, 6]
    assert budget.evicted == {("a", "hub"): 2, ("b", "hub"): 1}


def test_hub_budget_bookkeeping_stays_proportional_to_what_is_kept() -> None:
    """A busy channel evicting by count next to a quiet one that keeps an old event:
    the stale references behind the quiet one's are swept, not kept forever."""
    budget = Budget()
    quiet = History(10, budget=budget, name="quiet")
    busy = History(5, budget=budget, name="busy")
    quiet.append(sized(1, 10), publisher_id=False)
    for seq in range(2, 100_000):
        busy.append(sized(seq, 10), publisher_id=False)
    assert budget.count == 6
    assert len(budget._seqs) <= 2 * budget.count + 64
    assert budget.evicted == {("busy", "count"): 100_000 - 2 - 5}


def test_history_bytes_defaults() -> None:
    assert ChannelConfig().history_bytes == 16 * 1024 * 1024
    assert Limits().history_bytes == 256 * 1024 * 1024


async def test_large_messages_keep_history_within_its_byte_bound(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(
        {"chat": {"history": 100, "history_bytes": 300_000}, "other": {}},
        limits={"history_bytes": 1_000_000},
        admin=ADMIN,
    )
    big = b"x" * 100_000
    for _ in range(10):
        await redis_client.publish("chat", big)
    await wait_until(lambda: hub.hub.stats.received["chat"] == 10)
    history = hub.hub.channels["chat"].history
    assert len(history) == 2  # 100 KB payloads plus their id lines: two fit in 300,000
    assert history.bytes <= 300_000
    m = await scrape(hub.admin_port)
    assert one(m, "ssehub_history_evicted_total", channel="chat", reason="bytes") == 8
    assert one(m, "ssehub_history_evicted_total", channel="chat", reason="hub") == 0
    assert one(m, "ssehub_history_bytes") == history.bytes

    # The hub-wide bound takes the oldest first: chat's two go before other's.
    for _ in range(9):
        await redis_client.publish("other", big)
    await wait_until(lambda: hub.hub.stats.received["other"] == 9)
    assert len(history) == 0
    assert hub.hub.budget.bytes <= 1_000_000
    m = await scrape(hub.admin_port)
    assert one(m, "ssehub_history_evicted_total", channel="chat", reason="hub") == 2
    assert one(m, "ssehub_history_evicted_total", channel="other", reason="hub") == 0


async def test_expired_events_are_freed_on_a_quiet_channel(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"chat": {"history_ttl": 0.2}, "other": {}})
    for i in range(3):
        await redis_client.publish("chat", f"m{i}")
    history = hub.hub.channels["chat"].history
    await wait_until(lambda: hub.hub.stats.received["chat"] == 3)
    assert len(history) == 3
    # No new event and no resume on the channel: the hub's timer frees them.
    await wait_until(lambda: len(history) == 0, timeout=3)
    assert history.bytes == 0
    assert hub.hub.stats.evicted[("chat", "age")] == 3


# --- replay -------------------------------------------------------------------------


async def open_silent(port: int, path: str, last_id: str) -> socket.socket:
    """A resuming stream request from a client that will never read a byte of the answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = f"GET {path} HTTP/1.1\r\nHost: test\r\nLast-Event-ID: {last_id}\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    return sock


async def fill(
    redis_client: aioredis.Redis, channel: str, count: int, size: int, start: int = 0
) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for i in range(start, start + count):
        pipe.publish(channel, b"%s%06d " % (channel.encode(), i) + b"x" * size)
    await pipe.execute()


async def test_resumers_that_never_read_keep_memory_bounded(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """200 clients resume a full history on two channels and read nothing. Each replay
    is 3.2 MB; written at once that is 640 MB. Bounded, each holds at most half of
    max_buffer_bytes plus one event: stated bound 40 MB for all of them (200 KB each,
    aiohttp's own per-connection objects included)."""
    resumers, bound = 200, 40 * 1024 * 1024
    hub = await start_hub(
        {"a": {"history": 100}, "b": {"history": 100}},
        limits={"max_buffer_bytes": 65536},
    )
    await fill(redis_client, "a", 100, 16_000)
    await fill(redis_client, "b", 100, 16_000)
    await wait_until(lambda: hub.hub.seq == 200)
    healthy = await open_stream(hub.port, "/channels/a")
    silent: list[socket.socket] = []
    try:
        gc.collect()
        base = rss()
        origin = f"{hub.hub.epoch}-0"
        for _ in range(resumers // 10):
            for _ in range(10):
                silent.append(await open_silent(hub.port, "/events?channel=a&channel=b", origin))
            await wait_until(lambda: hub.hub.connections == len(silent) + 1)
            growth = rss() - base
            # Checked as they come: unbounded replays would take the machine's memory.
            assert growth < bound, f"{len(silent)} resumers: RSS +{growth / 2**20:.0f} MB"
        assert len(hub.hub.replays.catching_up) == resumers

        # Nobody else waits for them: live events and a reading resumer get through.
        reader = await open_stream(hub.port, "/events?channel=a&channel=b", origin)
        await reader.next_events(200, timeout=10)
        await redis_client.publish("a", "live")
        events = await healthy.next_events(1)
        assert [e.data for e in events] == ["live"]
        events = await reader.next_events(201)
        expected = [f"{c}{i:06d}" for c in "ab" for i in range(100)]
        assert [e.data[:7] for e in events[:200]] == expected
        assert events[-1].data == "live"
        await reader.close()
        assert rss() - base < bound
    finally:
        for sock in silent:
            sock.close()
        await healthy.close()
    await wait_until(lambda: hub.hub.connections == 0, timeout=10)
    assert hub.hub.replays.catching_up == {}
    assert hub.hub.fanout.mux == {}


@pytest.mark.parametrize("path", ["/channels/a", "/events?channel=a&channel=b"])
async def test_a_paced_replay_meets_the_live_stream_without_gap_or_duplicate(
    start_hub: StartHub, redis_client: aioredis.Redis, path: str
) -> None:
    total = 600
    hub = await start_hub(
        {"a": {"history": 2 * total}, "b": {"history": 2 * total}},
        limits={"max_buffer_bytes": 4096},
    )
    mux = path.startswith("/events")
    channels = ["a", "b"] if mux else ["a"]

    async def publish(start: int, stop: int) -> None:
        for first in range(start, stop, 20):
            pipe = redis_client.pipeline(transaction=False)
            for i in range(first, min(first + 20, stop)):
                pipe.publish(channels[i % len(channels)], f"m{i:04d}" + "x" * 500)
            await pipe.execute()
            await asyncio.sleep(0)

    await publish(0, total // 2)
    await wait_until(lambda: hub.hub.seq == total // 2)
    client = await open_stream(hub.port, path, f"{hub.hub.epoch}-0")
    task = asyncio.create_task(publish(total // 2, total))
    try:
        events = await client.next_events(total, timeout=20)
        await task
        assert [e.data[:5] for e in events] == [f"m{i:04d}" for i in range(total)]
        ids = [int(e.id.rsplit("-", 1)[1]) for e in events]
        assert ids == sorted(set(ids))
        assert hub.hub.stats.gaps == {}
    finally:
        task.cancel()
        await client.close()


async def test_history_evicted_under_a_paced_replay_is_signalled_at_that_point(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    # 10 MB of history: more than the kernel's socket buffers take (up to 4 MB here).
    hub = await start_hub({"a": {"history": 100}}, limits={"max_buffer_bytes": 65536})
    await fill(redis_client, "a", 100, 100_000)
    await wait_until(lambda: hub.hub.seq == 100)
    origin = f"{hub.hub.epoch}-0"
    sock = await open_silent(hub.port, "/channels/a", origin)
    client: SSEClient | None = None
    try:
        await wait_until(lambda: len(hub.hub.replays.catching_up) == 1)
        (replay,) = hub.hub.replays.catching_up.values()
        # The replay waits for a client that reads nothing (the kernel's buffers
        # took what they could): the history moves on meanwhile.
        await wait_until(lambda: replay.sub.transport.get_write_buffer_size() > 0)
        paused_at = replay.pos
        assert 0 < paused_at < 100
        await fill(redis_client, "a", 100, 100_000, start=100)  # evicts the first 100
        await wait_until(lambda: hub.hub.seq == 200)
        reader, writer = await asyncio.open_connection(sock=sock)
        client = SSEClient(reader, writer)
        await client._read_head(timeout=5)
        await client.read_until(lambda c: c.parser.last_id == hub.hub.position(), timeout=10)
        datas = [e.data[:7] if e.event == "message" else e.event for e in client.events]
        seen = [d for d in datas if d != GAP_EVENT]
        gap_at = datas.index(GAP_EVENT)
        assert datas.count(GAP_EVENT) == 1
        # Everything written before the gap is in order from the start, the gap comes
        # right after the last event the client had, then what history still holds.
        assert datas[:gap_at] == [f"a{i:06d}" for i in range(gap_at)]
        assert gap_at >= paused_at
        assert seen[gap_at:] == [f"a{i:06d}" for i in range(100, 200)]
        gap = json.loads(client.events[gap_at].data)
        assert gap["reason"] == "expired"
        assert gap["lastEventId"] == f"{hub.hub.epoch}-{gap_at}"
    finally:
        if client is not None:  # the socket is the stream's now
            await client.close()
        else:
            sock.close()


async def test_a_resumer_that_stops_reading_is_cut_as_slow(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"a": {"history": 100}}, heartbeat=0.2)
    await fill(redis_client, "a", 100, 100_000)
    await wait_until(lambda: hub.hub.seq == 100)
    sock = await open_silent(hub.port, "/channels/a", f"{hub.hub.epoch}-0")
    try:
        await wait_until(lambda: len(hub.hub.replays.catching_up) == 1)
        await wait_until(lambda: hub.hub.stats.closed["slow"] == 1, timeout=5)
        assert hub.hub.stats.slow_cut == 1
        assert hub.hub.connections == 0
        assert hub.hub.replays.catching_up == {}
    finally:
        sock.close()


# --- /events groups -----------------------------------------------------------------


async def test_new_channel_sets_past_max_event_groups_are_turned_away_as_busy(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"a": {}, "b": {}, "c": {}}, limits={"max_event_groups": 2})
    assert Limits().max_event_groups == 1000
    held = [
        await open_stream(hub.port, "/events?channel=a&channel=b"),
        await open_stream(hub.port, "/events?channel=c"),
    ]
    turned = await SSEClient.connect(
        hub.port, "/events?channel=a&channel=c", {"Accept": "text/event-stream"}
    )
    try:
        assert turned.status == 200
        await turned.read_to_eof()
        (busy,) = turned.events
        assert busy.event == BUSY_EVENT
        assert json.loads(busy.data)["reason"] == "max_event_groups"
        status, _, body = await http_request(hub.port, "/events?channel=b")
        assert (status, body) == (503, b"busy: max_event_groups\n")
        # An existing set still gets in, and so does a direct channel stream.
        same = await open_stream(hub.port, "/events?channel=b&channel=a")
        held += [same, await open_stream(hub.port, "/channels/a")]
        assert len(hub.hub.fanout.mux) == 2
        await redis_client.publish("a", "x")
        assert [e.data for e in await same.next_events(1)] == ["x"]
    finally:
        for c in [*held, turned]:
            await c.close()
    await wait_until(lambda: hub.hub.fanout.mux == {})
    again = await open_stream(hub.port, "/events?channel=a&channel=c")
    await again.close()


async def test_groups_following_different_sets_each_get_their_events_in_hub_order(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    names = ["a", "b", "c", "d"]
    hub = await start_hub({n: {} for n in names})
    sets = [["a"], ["a", "b"], ["b", "c", "d"], ["a", "c"], ["d", "a", "b", "c"]]
    clients = [
        await open_stream(hub.port, "/events?" + "&".join(f"channel={n}" for n in s)) for s in sets
    ]
    try:
        pipe = redis_client.pipeline(transaction=False)  # most of these in one flush
        published = [(names[i % 4 if i % 3 else 0], f"m{i}") for i in range(40)]
        for channel, data in published:
            pipe.publish(channel, data)
        await pipe.execute()
        for s, client in zip(sets, clients, strict=True):
            want = [(c, d) for c, d in published if c in s]
            events = await client.next_events(len(want))
            assert [(e.event, e.data) for e in events] == want
            ids = [int(e.id.rsplit("-", 1)[1]) for e in events]
            assert ids == sorted(set(ids))
    finally:
        for client in clients:
            await client.close()


async def test_public_channel_sets_cannot_spend_the_groups_of_private_ones(
    start_hub: StartHub, tmp_path: Path
) -> None:
    """1,000 anonymous /events connections with random sets exhausted max_event_groups
    for everyone (issue 20): sets with a private channel count on their own."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    hub = await start_hub(
        {"a": {}, "b": {}, "c": {}, "priv": {"auth": "token"}, "user.*": {"auth": "token"}},
        limits={"max_event_groups": 2},
        auth={"secret_file": str(secret)},
    )
    held = [
        await open_stream(hub.port, "/events?channel=a&channel=b"),
        await open_stream(hub.port, "/events?channel=a&channel=c"),
    ]
    try:
        turned = await SSEClient.connect(
            hub.port, "/events?channel=b&channel=c", {"Accept": "text/event-stream"}
        )
        await turned.read_to_eof()
        assert [json.loads(e.data)["reason"] for e in turned.events] == ["max_event_groups"]
        await turned.close()
        private = token(**{CLAIM: {"subscribe": ["priv", "user.*"]}})
        for path in ("channel=a&channel=priv", "channel=b&channel=priv", "channel=user.1"):
            held.append(await open_stream(hub.port, f"/events?{path}&token={private}"))
        # Each private channel (or family) has max_event_groups sets of its own.
        turned = await SSEClient.connect(
            hub.port,
            f"/events?channel=c&channel=priv&token={private}",
            {"Accept": "text/event-stream"},
        )
        await turned.read_to_eof()
        assert [json.loads(e.data)["reason"] for e in turned.events] == ["max_event_groups"]
        await turned.close()
    finally:
        for c in held:
            await c.close()
