"""Shared fixtures: one real redis-server per session, real hubs on port 0."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop

from ssehub.config import parse
from ssehub.server import HubServer

from .redis_server import RedisServer, free_port
from .sseclient import SSEClient, wait_until
from .topologies import ClusterTopology, OneRedis, SentinelTopology

StartHub = Callable[..., Awaitable[HubServer]]


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    """Tests run on uvloop, as the daemon does."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session", autouse=True)
def not_under_systemd() -> Iterator[None]:
    """Hubs started by tests must never notify a real systemd the test run may be under."""
    keys = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


# The test matrix's topologies (tests/test_matrix.py): each started on first use, once
# per session, and stopped at its end. A test that fails a master leaves the topology
# usable; the next failover heals it first.


@pytest.fixture(scope="session")
def one_topology() -> Iterator[OneRedis]:
    topology = OneRedis()
    topology.start()
    yield topology
    topology.stop()


@pytest.fixture(scope="session")
def sentinel_topology() -> Iterator[SentinelTopology]:
    topology = SentinelTopology()
    topology.start()
    yield topology
    topology.stop()


@pytest.fixture(scope="session")
def cluster_topology() -> Iterator[ClusterTopology]:
    topology = ClusterTopology()
    topology.start()
    yield topology
    topology.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def hub_config(redis_url: str, channels: dict[str, Any] | None = None, **overrides: Any) -> Any:
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "redis": {"url": redis_url},
        "channels": channels if channels is not None else {"chat": {}},
    }
    data.setdefault("shutdown_timeout", 2.0)
    data.update(overrides)
    return parse(data, source="test-config")


@pytest.fixture
async def start_hub(redis_server: RedisServer) -> AsyncIterator[StartHub]:
    """Start real hubs on port 0 against the session Redis (or ``redis_url=``)."""
    servers: list[HubServer] = []

    async def factory(
        channels: dict[str, Any] | None = None,
        *,
        redis_url: str | None = None,
        wait_ready: bool = True,
        **overrides: Any,
    ) -> HubServer:
        config = hub_config(redis_url or redis_server.url, channels, **overrides)
        server = HubServer(config)
        await server.start()
        servers.append(server)
        if wait_ready:
            await wait_until(lambda: server.broker.ready, timeout=10)
        return server

    yield factory
    for server in servers:
        await server.stop()


@pytest.fixture
async def clients() -> AsyncIterator[list[SSEClient]]:
    """Streams a test opens (append them): each is closed at the end."""
    opened: list[SSEClient] = []
    yield opened
    for c in opened:
        await c.close()


@pytest.fixture
def dead_redis_url() -> str:
    """A loopback URL where nothing listens."""
    return f"redis://127.0.0.1:{free_port()}/0"
