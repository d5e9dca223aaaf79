"""The garbage collector kept off long-lived connections: rarer full collections, and a
storm's connections frozen once it settled (unfrozen once most of them are gone)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from ssehub.http.collector import Collector

from .conftest import StartHub
from .sseclient import SSEClient, open_stream, wait_until


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    """Collectors a test starts: stopped, and the process unfrozen, at the end (the
    test process must not keep its garbage frozen for the tests after it)."""
    started: list[Collector] = []
    yield started
    for c in started:
        c.stop()
    gc.unfreeze()


@contextlib.contextmanager
def held(collector: Collector) -> Iterator[None]:
    """The server's sweeps (one every request_timeout) leave ``collector`` alone while
    the block's streams come or go: one that came half-way would freeze, or unfreeze,
    at a count this test never meant (seen: frozen_at 42 of 60 on a loaded machine)."""
    collector.active = False
    try:
        yield
    finally:
        collector.active = True


def test_start_makes_full_collections_rarer_and_times_them(collectors: list[Collector]) -> None:
    before = gc.get_threshold()
    collector = Collector()
    collector.start()
    collectors.append(collector)
    # Full collections every 100 young ones, not Python's 10.
    assert gc.get_threshold() == (before[0], before[1], 100)
    assert gc.get_freeze_count() > 0  # start-up's objects
    full = collector.full_collections
    gc.collect()
    assert collector.full_collections == full + 1
    assert collector.full_seconds > 0
    collector.stop()
    assert gc.get_threshold() == before
    gc.collect()
    assert collector.full_collections == full + 1  # no longer timed


async def test_a_settled_storm_is_frozen_then_unfrozen_once_it_is_gone(
    start_hub: StartHub,
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
    collectors: list[Collector],
) -> None:
    hub = await start_hub(limits={"request_timeout": 0.1})  # the sweep that settles
    hub.collector.growth = 40
    hub.collector.start()
    collectors.append(hub.collector)
    for _ in range(30):
        clients.append(await open_stream(hub.port, "/channels/chat"))
    sweeps = hub.collector.freezes
    await wait_until(lambda: hub.hub.connections == 30)
    frozen = gc.get_freeze_count()
    with held(hub.collector):
        for _ in range(30):  # 60 open: past the growth of 40
            clients.append(await open_stream(hub.port, "/channels/chat"))
        await wait_until(lambda: hub.hub.connections == 60)
    await wait_until(lambda: hub.collector.freezes == sweeps + 1)
    assert hub.collector.frozen_at == 60
    # Each connection's objects: its transport, protocol, parser, request, tasks...
    assert gc.get_freeze_count() - frozen > 30 * 20
    # Frozen streams are streams as before.
    await redis_client.publish("chat", "after the freeze")
    for c in clients:
        assert [e.data for e in await c.next_events(1)] == ["after the freeze"]
    # Less than half of them left: everything is unfrozen, for a full review.
    with held(hub.collector):
        for c in clients[:40]:
            await c.close()
        await wait_until(lambda: hub.hub.connections == 20)
    await wait_until(lambda: gc.get_freeze_count() == 0)
    assert hub.collector.frozen_at == 20
    assert hub.collector.freezes == sweeps + 1
