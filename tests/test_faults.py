"""Redis faults, end to end: absent at start, killed, connection cut, half-open.

Each test runs its own redis-server (never the session one) so it can kill it, and
stops it in ``finally``. Redis is killed with SIGKILL, as a crash would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from ssehub.config import RedisConfig
from ssehub.hub.hub import GAP_EVENT
from ssehub.redis.pubsub import Broker, BrokerState
from ssehub.server import HubServer

from .conftest import StartHub
from .proxy import Proxy
from .redis_server import RedisServer, free_port
from .sseclient import SSEClient, http_request, wait_until

pytestmark = pytest.mark.slow


async def status(port: int, path: str) -> int:
    code, _, _ = await http_request(port, path)
    return code


async def is_status(port: int, path: str, code: int) -> bool:
    return await status(port, path) == code


async def open_stream(port: int, path: str, last_id: str | None = None) -> SSEClient:
    headers = {"Last-Event-ID": last_id} if last_id is not None else None
    client = await SSEClient.connect(port, path, headers)
    assert client.status == 200, client.headers
    await client.read_until(lambda c: c.parser.last_id)  # the position marker: subscribed
    return client


def gaps(client: SSEClient) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in client.events if e.event == GAP_EVENT]


def data(client: SSEClient) -> list[str]:
    return [e.data for e in client.events if e.event != GAP_EVENT]


async def kill_pubsub_clients(admin: aioredis.Redis) -> int:
    """``CLIENT KILL TYPE pubsub``: cut the hub's subscription while Redis stays up."""
    command = admin.execute_command  # untyped in redis-py
    return int(await command("CLIENT", "KILL", "TYPE", "pubsub"))  # type: ignore[no-untyped-call]


def broker_lines(caplog: pytest.LogCaptureFixture) -> dict[str, int]:
    """How many times each broker state line was logged."""
    counts = {"redis unavailable": 0, "redis subscribed": 0, "redis down": 0}
    for record in caplog.records:
        if record.name == "ssehub.redis.pubsub":
            for key in counts:
                if record.getMessage().startswith(key):
                    counts[key] += 1
    return counts


def count_attempts(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the broker's connection attempts (observed, not changed)."""
    attempts = [0]
    connect: Callable[[], Awaitable[Any]] = hub.broker._connect

    async def counting() -> Any:
        attempts[0] += 1
        return await connect()

    monkeypatch.setattr(hub.broker, "_connect", counting)
    return attempts


async def test_starts_without_redis_and_gets_ready_when_it_appears(
    start_hub: StartHub, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="ssehub.redis.pubsub")
    redis = RedisServer()
    redis.port = free_port()  # nothing listens there yet; start() will use it
    try:
        hub = await start_hub(
            redis_url=redis.url,
            wait_ready=False,
            redis={"url": redis.url, "reconnect_min": 0.02, "reconnect_max": 0.1},
        )
        attempts = count_attempts(hub, monkeypatch)
        assert await status(hub.port, "/healthz") == 200
        assert await status(hub.port, "/readyz") == 503
        # Several retry cycles, one line.
        await wait_until(lambda: attempts[0] >= 8, timeout=5)
        assert await status(hub.port, "/readyz") == 503
        assert broker_lines(caplog) == {
            "redis unavailable": 1,
            "redis subscribed": 0,
            "redis down": 0,
        }

        await asyncio.to_thread(redis.start)
        await wait_until(lambda: hub.broker.ready, timeout=3)
        assert await status(hub.port, "/readyz") == 200
        assert broker_lines(caplog) == {
            "redis unavailable": 1,
            "redis subscribed": 1,
            "redis down": 0,
        }
        # And it works: a message published now is delivered.
        client = await open_stream(hub.port, "/channels/chat")
        pub = aioredis.Redis.from_url(redis.url)
        try:
            await pub.publish("chat", "hello")
            await client.next_events(1)
            assert data(client) == ["hello"]
            assert gaps(client) == []  # never up before: nothing was missed
        finally:
            await pub.aclose()
            await client.close()
    finally:
        redis.stop()


async def test_kill_and_restart_redis_keeps_streams_and_signals_the_gap(
    start_hub: StartHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ssehub.redis.pubsub")
    redis = RedisServer()
    redis.start()
    clients: list[SSEClient] = []
    pub = aioredis.Redis.from_url(redis.url)
    try:
        hub = await start_hub(
            {"chat": {}, "news": {}},
            redis_url=redis.url,
            heartbeat=0.2,
            redis={"url": redis.url, "reconnect_max": 0.5},
        )
        clients = [await open_stream(hub.port, "/channels/chat") for _ in range(3)]
        clients.append(await open_stream(hub.port, "/events?channel=chat&channel=news"))
        await pub.publish("chat", "before")
        for c in clients:
            await c.next_events(1)
        before_id = clients[0].events[-1].id
        mux_before_id = clients[-1].events[-1].id
        await pub.aclose()

        redis.kill()
        await wait_until(lambda: not hub.broker.ready, timeout=2)
        assert await status(hub.port, "/readyz") == 503
        # Streams stay open, kept alive by heartbeats, while Redis is away.
        marks = [len(c.parser.comments) for c in clients]
        for c, mark in zip(clients, marks, strict=True):
            await c.read_until(lambda c, mark=mark: len(c.parser.comments) >= mark + 3, 3)
            assert not c.eof
        assert hub.hub.connections == len(clients)
        assert await status(hub.port, "/readyz") == 503

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(redis.start)  # returns once Redis answers PING
        answering = loop.time()
        await wait_until(lambda: hub.broker.ready, timeout=5)
        resubscribed = loop.time() - answering
        assert resubscribed < 2.0, f"resubscribed {resubscribed:.2f}s after Redis answered"
        assert await status(hub.port, "/readyz") == 200
        assert hub.broker.reconnects == 1

        # Every stream is told, in-band, that it may have missed events.
        for c in clients[:3]:
            await c.read_until(lambda c: gaps(c), 3)
            assert gaps(c) == [{"channel": "chat", "reason": "redis_outage", "lastEventId": None}]
        mux = clients[-1]
        await mux.read_until(lambda c: len(gaps(c)) >= 2, 3)
        assert sorted((g["channel"], g["reason"]) for g in gaps(mux)) == [
            ("chat", "redis_outage"),
            ("news", "redis_outage"),
        ]

        # Delivery resumes, behind the gap signal.
        pub = aioredis.Redis.from_url(redis.url)
        await pub.publish("chat", "after")
        await pub.publish("news", "news after")
        for c in clients[:3]:
            await c.read_until(lambda c: "after" in data(c), 3)
            assert data(c) == ["before", "after"]
            kinds = [e.event for e in c.events]
            assert kinds == ["message", GAP_EVENT, "message"]
        await mux.read_until(lambda c: "news after" in data(c), 3)
        assert data(mux) == ["before", "after", "news after"]

        # A client that comes back with a position from before the outage is told too.
        late = await open_stream(hub.port, "/channels/chat", before_id)
        clients.append(late)
        assert gaps(late) == [
            {"channel": "chat", "reason": "redis_outage", "lastEventId": before_id}
        ]
        assert data(late) == ["after"]  # what the hub has: replayed after the signal
        late_mux = await open_stream(hub.port, "/events?channel=chat&channel=news", mux_before_id)
        clients.append(late_mux)
        assert {g["channel"] for g in gaps(late_mux)} == {"chat", "news"}
        assert {g["reason"] for g in gaps(late_mux)} == {"redis_outage"}

        # One line per state change, not per retry.
        assert broker_lines(caplog) == {
            "redis unavailable": 0,
            "redis subscribed": 2,
            "redis down": 1,
        }
    finally:
        for c in clients:
            await c.close()
        await pub.aclose()
        redis.stop()


async def test_client_kill_of_the_hub_connection_resubscribes(start_hub: StartHub) -> None:
    redis = RedisServer()
    redis.start()
    admin = aioredis.Redis.from_url(redis.url)
    client: SSEClient | None = None
    try:
        hub = await start_hub(redis_url=redis.url, redis={"url": redis.url, "reconnect_max": 0.5})
        client = await open_stream(hub.port, "/channels/chat")
        await admin.publish("chat", "before")
        await client.next_events(1)

        assert await kill_pubsub_clients(admin) == 1
        await wait_until(lambda: hub.broker.reconnects == 1 and hub.broker.ready, timeout=3)
        await client.read_until(lambda c: gaps(c), 3)
        assert gaps(client)[0]["reason"] == "redis_outage"

        # Exactly one subscription again: the old one is gone, none was doubled.
        assert await admin.pubsub_numsub("chat") == [(b"chat", 1)]
        await admin.publish("chat", "after")
        await client.read_until(lambda c: "after" in data(c), 3)
        assert data(client) == ["before", "after"]
        assert await status(hub.port, "/readyz") == 200
    finally:
        if client is not None:
            await client.close()
        await admin.aclose()
        redis.stop()


async def test_half_open_redis_connection_is_detected_by_health_checks(
    start_hub: StartHub,
) -> None:
    redis = RedisServer()
    redis.start()
    proxy = Proxy(redis.port)
    await proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    pub = aioredis.Redis.from_url(redis.url)
    client: SSEClient | None = None
    try:
        hub = await start_hub(
            redis_url=url,
            heartbeat=0.2,
            redis={
                "url": url,
                "health_check_interval": 0.3,
                "health_check_timeout": 0.3,
                "connect_timeout": 0.5,
                "reconnect_max": 0.3,
            },
        )
        client = await open_stream(hub.port, "/channels/chat")
        await pub.publish("chat", "before")
        await client.next_events(1)

        # Health checks on an idle, healthy connection do not cause reconnects.
        await client.read_until(lambda c: len(c.parser.comments) >= 5, 3)
        assert hub.broker.ready and hub.broker.reconnects == 0

        proxy.blackholed = True
        # Declared down within a bounded time: interval + timeout + a check tick (~0.75 s).
        await wait_until(lambda: is_status(hub.port, "/readyz", 503), timeout=2, interval=0.05)
        assert hub.broker.state is BrokerState.DOWN
        # New connections get through the proxy but nothing answers: still not ready.
        accepted = proxy.accepted
        await wait_until(lambda: proxy.accepted >= accepted + 2, timeout=5)
        assert hub.broker.state is BrokerState.DOWN
        assert not client.eof

        proxy.blackholed = False
        await wait_until(lambda: hub.broker.ready, timeout=3)
        assert await status(hub.port, "/readyz") == 200
        await client.read_until(lambda c: gaps(c), 3)
        assert gaps(client)[0]["reason"] == "redis_outage"
        await pub.publish("chat", "after")
        await client.read_until(lambda c: "after" in data(c), 3)
        assert data(client) == ["before", "after"]
    finally:
        if client is not None:
            await client.close()
        await pub.aclose()
        await proxy.stop()
        redis.stop()


async def test_broker_survives_a_failing_state_listener() -> None:
    """The hub's DOWN -> UP listener writes the gap signal to every stream; if that
    raises (say, a transport closed under it), the subscription must go on, not die
    silently while the broker still reports itself up."""
    redis = RedisServer()
    redis.start()
    admin = aioredis.Redis.from_url(redis.url)
    received: list[bytes] = []
    changes: list[BrokerState] = []

    def on_state(old: BrokerState, new: BrokerState) -> None:
        changes.append(new)
        if old is BrokerState.DOWN:
            raise RuntimeError("listener bug")

    broker = Broker(
        RedisConfig(url=redis.url, reconnect_max=0.2),
        ["chat"],
        lambda channel, payload: received.append(payload),
        on_state,
    )
    task = asyncio.create_task(broker.run())
    try:
        await wait_until(lambda: broker.ready, timeout=5)
        for round_ in (1, 2):
            assert await kill_pubsub_clients(admin) == 1
            await wait_until(lambda r=round_: broker.reconnects == r and broker.ready, timeout=3)
            assert not task.done()
            await admin.publish("chat", f"after {round_}")
            await wait_until(lambda r=round_: len(received) == r, timeout=3)
        assert received == [b"after 1", b"after 2"]
        assert changes == [BrokerState.UP, *[BrokerState.DOWN, BrokerState.UP] * 2]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await admin.aclose()
        redis.stop()
