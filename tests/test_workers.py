"""``workers: N``: the node as real processes -- a main process and its workers on one port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ssehub.core.ids import compact

from .hubprocess import WORKERS, Node, alive, write_config
from .redis_server import RedisServer
from .sseclient import Event, SSEClient, open_stream, wait_until
from .test_metrics import one, scrape
from .test_systemd import FakeSystemd

pytestmark = pytest.mark.slow

# Streams opened to reach every worker: SO_REUSEPORT spreads connections by a hash of
# their addresses, so 12 all landing on one of two workers has odds of 1 in 2,048.
SPREAD = 12


@pytest.fixture
def node_config(tmp_path: Path, redis_server: RedisServer) -> Path:
    return write_config(tmp_path / "hub.yaml", redis_server.url)


@pytest.fixture
def node(node_config: Path) -> Iterator[Node]:
    n = Node(node_config)
    yield n
    n.stop()


async def spread(node: Node, clients: list[SSEClient], path: str, **kw: str) -> list[SSEClient]:
    """``SPREAD`` streams, and proof from the node's metrics that every worker holds some."""
    new = [await open_stream(node.port, path, **kw) for _ in range(SPREAD)]
    clients.extend(new)

    async def every_worker_serves() -> bool:
        m = await scrape(node.admin_port)
        per = [one(m, "ssehub_worker_connections", worker=str(i)) for i in range(WORKERS)]
        return sum(per) >= len(new) and all(per)

    await wait_until(every_worker_serves, timeout=10)
    return new


async def test_every_worker_serves_and_one_scrape_sums_them(
    node: Node, clients: list[SSEClient], redis_client: aioredis.Redis
) -> None:
    streams = await spread(node, clients, "/channels/chat")
    for i in range(3):
        await redis_client.publish("chat", f"m{i}")
    got = [await c.next_events(3) for c in streams]
    # One numbering for the node: every worker sent the same ids.
    assert len({tuple((e.id, e.data) for e in events) for events in got}) == 1
    m = await scrape(node.admin_port)
    assert one(m, "ssehub_workers") == WORKERS
    assert one(m, "ssehub_connections") == SPREAD
    assert one(m, "ssehub_channel_connections", channel="chat") == SPREAD
    assert one(m, "ssehub_connections_opened_total", channel="chat") == SPREAD
    # Parsed once, in main; delivered by the workers.
    assert one(m, "ssehub_messages_received_total", channel="chat") == 3
    assert one(m, "ssehub_events_delivered_total") == 3 * SPREAD
    assert one(m, "ssehub_redis_up") == 1
    assert one(m, "ssehub_delivery_delay_seconds_count") >= WORKERS


async def published(
    node: Node, clients: list[SSEClient], redis_client: aioredis.Redis, n: int
) -> list[Event]:
    """``n`` messages published on chat, as one stream of the node saw them."""
    first = await open_stream(node.port, "/channels/chat")
    clients.append(first)
    for i in range(n):
        await redis_client.publish("chat", f"m{i}")
    return await first.next_events(n)


async def test_a_reconnect_to_another_worker_resumes_exactly(
    node: Node, clients: list[SSEClient], redis_client: aioredis.Redis
) -> None:
    seen = await published(node, clients, redis_client, 4)
    # Resume from the second event on every worker: the same two events, same ids.
    resumed = await spread(node, clients, "/channels/chat", last_id=seen[1].id or "")
    for c in resumed:
        assert [(e.id, e.data) for e in await c.next_events(2)] == [
            (e.id, e.data) for e in seen[2:]
        ]
    await redis_client.publish("chat", "live")
    for c in resumed:
        assert [e.data for e in await c.next_events(3)][2:] == ["live"]


async def test_family_members_are_node_wide(
    tmp_path: Path, redis_server: RedisServer, clients: list[SSEClient]
) -> None:
    config = write_config(
        tmp_path / "hub.yaml", redis_server.url, "{'user.*': {redis_channel: 'app:user:*'}}"
    )
    node = Node(config)
    redis_client = aioredis.Redis.from_url(redis_server.url)
    try:
        first = await open_stream(node.port, "/channels/user.7")
        clients.append(first)
        await redis_client.publish("app:user:7", "one")
        (seen,) = await first.next_events(1)
        streams = await spread(node, clients, "/channels/user.7", last_id=seen.id or "")
        await redis_client.publish("app:user:7", "two")
        for c in streams:
            assert [e.data for e in await c.next_events(1)] == ["two"]  # "one" was seen
        m = await scrape(node.admin_port)
        assert one(m, "ssehub_family_members", family="user.*") == 1
        # One Redis subscription for the node, whatever the number of workers.
        assert await redis_client.pubsub_numsub("app:user:7") == [(b"app:user:7", 1)]
    finally:
        await redis_client.aclose()
        node.stop()


async def test_a_killed_worker_is_replaced_and_resumes_from_the_snapshot(
    node: Node, clients: list[SSEClient], redis_client: aioredis.Redis
) -> None:
    streams = await spread(node, clients, "/channels/chat")  # on every worker
    for i in range(3):
        await redis_client.publish("chat", f"m{i}")
    for c in streams:
        await c.next_events(3)
    seen = streams[0].events
    before = await scrape(node.admin_port)  # every worker's counters, as of now
    held = [one(before, "ssehub_worker_connections", worker=str(i)) for i in range(WORKERS)]
    assert one(before, "ssehub_connections_opened_total", channel="chat") == SPREAD
    assert one(before, "ssehub_events_delivered_total") == 3 * SPREAD
    victim = node.worker_pids()[0]
    mark = len(node.lines)
    os.kill(victim, signal.SIGKILL)
    node.wait_for(r"worker exited worker=0 .*code=-9 restart_in=", mark)
    node.wait_for(r"worker ready worker=0", mark)
    assert node.worker_pids()[0] != victim
    after = await scrape(node.admin_port)
    assert one(after, "ssehub_workers") == WORKERS
    assert one(after, "ssehub_worker_restarts_total") == 1
    # The new worker's history counts in its hub's budget, as its sibling's does (the
    # node's gauge sums them): a reload of history_bytes and age expiry apply to it.
    kept = one(before, "ssehub_history_bytes")
    assert kept > 0 and one(after, "ssehub_history_bytes") == kept
    # The dead worker held streams and had delivered: its counters stay in the node's
    # totals, exactly; its gauges went with it.
    for name, labels in [
        ("ssehub_connections_opened_total", {"channel": "chat"}),
        ("ssehub_events_delivered_total", {}),
        ("ssehub_messages_received_total", {"channel": "chat"}),
    ]:
        assert one(after, name, **labels) == one(before, name, **labels), name
    assert one(after, "ssehub_connections") == held[1]
    # The new worker has the node's history: resumes on it are exact too.
    resumed = await spread(node, clients, "/channels/chat", last_id=seen[0].id or "")
    for c in resumed:
        assert [e.id for e in await c.next_events(2)] == [e.id for e in seen[1:]]


async def test_sighup_reloads_every_worker_and_a_bad_config_is_rejected_once(
    node: Node, node_config: Path, redis_server: RedisServer, clients: list[SSEClient]
) -> None:
    write_config(node_config, redis_server.url, "{chat: {}, later: {}}")
    mark = len(node.lines)
    node.proc.send_signal(signal.SIGHUP)
    assert "added=later" in node.wait_for(r"reloaded .*", mark)[0]
    await spread(node, clients, "/channels/later")
    await asyncio.to_thread(node_config.write_text, "channels: [not, a, mapping]\n")
    mark = len(node.lines)
    node.proc.send_signal(signal.SIGHUP)
    node.wait_for(r"reload rejected", mark)
    await spread(node, clients, "/channels/later")  # every worker kept the old config
    assert node.count(r"reload rejected") == 1
    assert node.count(r"reloaded ") == 1


async def test_sigterm_drains_every_worker(node: Node, clients: list[SSEClient]) -> None:
    streams = await spread(node, clients, "/channels/chat")
    pids = node.worker_pids()
    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    for c in streams:
        await c.read_to_eof(timeout=5)
        assert c.ended_cleanly
    assert await asyncio.to_thread(node.proc.wait, 10) == 0
    assert time.monotonic() - started < 3 + 2
    assert not any(alive(pid) for pid in pids.values())


async def test_limits_are_per_worker(
    tmp_path: Path, redis_server: RedisServer, clients: list[SSEClient]
) -> None:
    config = write_config(
        tmp_path / "hub.yaml", redis_server.url, extra="limits: {max_connections: 1}\n"
    )
    node = Node(config)
    try:
        accepted = 0
        for _ in range(SPREAD):
            c = await SSEClient.connect(
                node.port, "/channels/chat", {"Accept": "text/event-stream"}
            )
            clients.append(c)
            # A stream gets its position line; one turned away, the busy event.
            await c.read_until(lambda c: c.parser.last_id or c.events)
            accepted += 1 if c.parser.last_id else 0
        m = await scrape(node.admin_port)
        per = [one(m, "ssehub_worker_connections", worker=str(i)) for i in range(WORKERS)]
        assert all(n <= 1 for n in per), per
        assert sum(per) == accepted
        assert 1 <= accepted <= WORKERS
        assert one(m, "ssehub_connections_closed_total", reason="limit") == SPREAD - accepted
    finally:
        node.stop()


CPUS = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("value", "cpus", "workers"),
    [
        ("2", CPUS, 2),
        # The CPUs the process may use, not the machine's: pinned to one, one worker.
        ("auto", CPUS[:1], 1),
        ("auto", CPUS, len(CPUS)),
    ],
    ids=["2", "auto-pinned", "auto"],
)
def test_check_reports_the_workers(
    tmp_path: Path, value: str, cpus: list[int], workers: int
) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text(f"workers: {value}\nchannels: {{chat: {{}}}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "ssehub", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    assert result.returncode == 0, result.stderr
    noun = "worker" if workers == 1 else "workers"
    assert result.stdout == f"{config}: ok (1 channel, 0 families, {workers} {noun})\n"


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    yield fake
    fake.close()


def drain(systemd: FakeSystemd, seconds: float) -> list[dict[str, str]]:
    """Every datagram that arrives within ``seconds``."""
    out = []
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        with contextlib.suppress(TimeoutError):
            out.append(systemd.receive(left))
    return out


def test_systemd_sees_the_node(
    tmp_path: Path, redis_server: RedisServer, systemd: FakeSystemd
) -> None:
    config = write_config(tmp_path / "hub.yaml", redis_server.url)
    # 400 ms watchdog: a ping every 200 ms while every worker answers.
    node = Node(config, {"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "400000"})
    try:
        ready = systemd.receive_until("READY")[-1]
        assert ready["STATUS"] == f"connections=0 redis=up workers={WORKERS}/{WORKERS}"
        assert node.count(r"worker ready") == WORKERS  # READY=1 came after every worker
        with socket.create_connection(("127.0.0.1", node.port)) as stream:
            stream.sendall(b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n\r\n")
            assert stream.recv(100).startswith(b"HTTP/1.1 200")
            while systemd.receive().get("STATUS", "").split(" ")[0] != "connections=1":
                pass
        # A worker whose loop stops answering stops the node's watchdog pings.
        worker = node.worker_pids()[1]
        os.kill(worker, signal.SIGSTOP)
        try:
            drain(systemd, 1.0)  # pings stop within 4 ping intervals (0.8 s)
            late = drain(systemd, 1.0)
            assert not any("WATCHDOG" in m for m in late), late
        finally:
            os.kill(worker, signal.SIGCONT)
        assert systemd.receive_until("WATCHDOG")[-1]["WATCHDOG"] == "1"
        node.proc.send_signal(signal.SIGTERM)
        systemd.receive_until("STOPPING")
        assert node.proc.wait(timeout=15) == 0
    finally:
        node.stop()


# --- stream channels: main reads, workers serve -----------------------------------------


async def xadd(client: aioredis.Redis, stream: str, data: str) -> str:
    entry_id = await client.xadd(stream, {"data": data})
    return entry_id.decode()


@contextlib.contextmanager
def running(tmp_path: Path, redis_server: RedisServer, channels: str) -> Iterator[Node]:
    node = Node(write_config(tmp_path / "hub.yaml", redis_server.url, channels))
    try:
        yield node
    finally:
        node.stop()


def pairs(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.id, e.data) for e in events]


async def test_a_stream_channel_is_served_by_every_worker_with_entry_ids(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
) -> None:
    key = "test:workers:live"
    await redis_client.delete(key)
    before = await xadd(redis_client, key, "before")
    with running(tmp_path, redis_server, f"{{orders: {{stream: '{key}'}}}}") as node:
        streams = await spread(node, clients, "/channels/orders")
        # Every worker knows where the stream stands (main's reader told them).
        assert {c.parser.last_id for c in streams} == {before}
        added = [(await xadd(redis_client, key, f"e{i}"), f"e{i}") for i in range(3)]
        for c in streams:
            assert pairs(await c.next_events(3)) == added
        # /events carries the stream's position in its ids on every worker too.
        mux = await spread(node, clients, "/events?channel=orders")
        assert {c.parser.last_id.split("~")[1] for c in mux} == {compact(added[-1][0])}
        # An /events id resumes the stream at its position on any worker.
        hub_part = mux[0].parser.last_id.split("~")[0]
        back = f"{hub_part}~{compact(added[0][0])}"
        resumed = await spread(node, clients, "/events?channel=orders", last_id=back)
        late = await xadd(redis_client, key, "live")
        for c in resumed:
            got = await c.next_events(3)
            assert [(e.event, e.data) for e in got] == [
                ("orders", "e1"),
                ("orders", "e2"),
                ("orders", "live"),
            ]
            assert got[-1].id.endswith("~" + compact(late))
        # One XREAD reader for the node, in main's process: workers never read streams.
        blocked = await redis_client.client_list()
        assert sum(1 for c in blocked if c.get("cmd") == "xread") == 1, blocked
        m = await scrape(node.admin_port)
        assert one(m, "ssehub_messages_received_total", channel="orders") == 4  # parsed once


async def test_a_listed_stream_key_refused_ends_and_waits_on_every_worker_until_fixed(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
) -> None:
    """Main's reader is refused a key that holds no stream; it asks again each heartbeat,
    and once the key is fixed every worker's waiting browsers go live. Broken again
    while live, every worker ends its streams, as one process does."""
    key, nudge = "test:workers:fixed", "test:workers:nudge"
    await redis_client.delete(nudge)
    await redis_client.set(key, "not a stream")
    channels = f"{{orders: {{stream: '{key}'}}, other: {{stream: '{nudge}'}}}}"
    config = write_config(tmp_path / "hub.yaml", redis_server.url, channels, "heartbeat: 0.2\n")
    node = Node(config)
    try:
        for _ in range(SPREAD):
            clients.append(await SSEClient.connect(node.port, "/channels/orders"))
        assert {c.status for c in clients} == {200}
        # Refused at start and at least once more: the browsers wait, with no position.
        for c in clients:
            await c.read_until(lambda c: c.body.count(b":\n") >= 2, timeout=5)
        m = await scrape(node.admin_port)
        assert one(m, "ssehub_stream_errors_total", channel="orders") >= 2
        assert not any(c.parser.last_id for c in clients)
        async with redis_client.pipeline(transaction=True) as fix:
            fix.delete(key)
            fix.xadd(key, {"data": "first"})
            first = (await fix.execute())[1].decode()
        for c in clients:
            await c.read_until(lambda c: c.parser.last_id == first, timeout=10)
        added = await xadd(redis_client, key, "after the fix")
        for c in clients:
            assert pairs(await c.next_events(1)) == [(added, "after the fix")]
        m = await scrape(node.admin_port)
        per = [one(m, "ssehub_worker_connections", worker=str(i)) for i in range(WORKERS)]
        assert sum(per) == SPREAD and all(per)  # every worker had some waiting
        async with redis_client.pipeline(transaction=True) as breaking:
            breaking.delete(key)
            breaking.set(key, "not a stream")
            await breaking.execute()
        await xadd(redis_client, nudge, "the shared XREAD runs again")
        for c in clients:
            await c.read_to_eof(timeout=10)
            assert c.ended_cleanly
        m = await scrape(node.admin_port)
        assert one(m, "ssehub_connections_closed_total", reason="stream_error") == SPREAD
        # A browser that comes back waits (no position) until the key is fixed again.
        back = await SSEClient.connect(node.port, "/channels/orders")
        clients.append(back)
        await back.read_until(lambda c: c.body.count(b":\n") >= 2, timeout=5)
        assert back.parser.last_id == ""
        async with redis_client.pipeline(transaction=True) as fix:
            fix.delete(key)
            fix.xadd(key, {"data": "again"})
            fixed = (await fix.execute())[1].decode()
        await back.read_until(lambda c: c.parser.last_id == fixed, timeout=10)
    finally:
        node.stop()


async def test_a_stream_client_resumes_on_any_worker_from_the_cache_and_from_redis(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
) -> None:
    key = "test:workers:resume"
    await redis_client.delete(key)
    # Six entries before the node starts (main's reader prefills the cache with the
    # newest four and the workers get them through the feed), six while it runs.
    entries = [(await xadd(redis_client, key, f"e{i}"), f"e{i}") for i in range(6)]
    with running(tmp_path, redis_server, f"{{orders: {{stream: '{key}', history: 4}}}}") as node:
        first = await open_stream(node.port, "/channels/orders")
        clients.append(first)
        entries += [(await xadd(redis_client, key, f"e{i}"), f"e{i}") for i in range(6, 12)]
        assert pairs(await first.next_events(6)) == entries[6:]
        # From the cache (e9 is among the newest four) and from Redis (e2 is older: XRANGE
        # on the worker's replay connection, then the cache), on every worker.
        cached = await spread(node, clients, "/channels/orders", last_id=entries[9][0])
        older = await spread(node, clients, "/channels/orders", last_id=entries[2][0])
        late = await xadd(redis_client, key, "live")
        for c in cached:
            assert pairs(await c.next_events(3)) == [*entries[10:], (late, "live")]
        for c in older:
            assert pairs(await c.next_events(10)) == [*entries[3:], (late, "live")]
        m = await scrape(node.admin_port)
        assert one(m, "ssehub_stream_replays_total", channel="orders") == SPREAD
        assert one(m, "ssehub_gaps_total", channel="orders") == 0
        # A worker started later gets the positions in its snapshot.
        victim = node.worker_pids()[0]
        mark = len(node.lines)
        os.kill(victim, signal.SIGKILL)
        node.wait_for(r"worker ready worker=0", mark)
        again = await spread(node, clients, "/channels/orders", last_id=entries[10][0])
        for c in again:
            assert pairs(await c.next_events(2)) == [entries[11], (late, "live")]
        fresh = await spread(node, clients, "/channels/orders")
        assert {c.parser.last_id for c in fresh} == {late}


async def test_a_family_of_stream_channels_with_workers(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
) -> None:
    key = "test:workers:fam:7"
    await redis_client.delete(key)
    old = await xadd(redis_client, key, "old")
    channels = "{'orders.*': {stream: 'test:workers:fam:*', history: 10}}"
    with running(tmp_path, redis_server, channels) as node:
        # The first stream of the member, on either worker: main starts reading the
        # member's stream, and the worker's stream waits for that.
        first = await open_stream(node.port, "/channels/orders.7")
        clients.append(first)
        assert first.parser.last_id == old
        one_id = await xadd(redis_client, key, "one")
        assert pairs(await first.next_events(1)) == [(one_id, "one")]
        # Every worker has the member, its position and its entries.
        streams = await spread(node, clients, "/channels/orders.7", last_id=old)
        two = await xadd(redis_client, key, "two")
        for c in streams:
            assert pairs(await c.next_events(2)) == [(one_id, "one"), (two, "two")]
        m = await scrape(node.admin_port)
        assert one(m, "ssehub_family_members", family="orders.*") == 1
        # Another member: read from its start on, every worker live for it.
        other = "test:workers:fam:8"
        await redis_client.delete(other)
        eights = await spread(node, clients, "/channels/orders.8")
        assert {c.parser.last_id for c in eights} == {"0-0"}
        eight = await xadd(redis_client, other, "eight")
        for c in eights:
            assert pairs(await c.next_events(1)) == [(eight, "eight")]
        blocked = await redis_client.client_list()
        assert sum(1 for c in blocked if c.get("cmd") == "xread") == 1, blocked
