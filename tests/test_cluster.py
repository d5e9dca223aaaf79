"""Redis Cluster: sharded pub/sub on the master owning each channel, following failovers.

A real cluster (three masters, a replica each, on free loopback ports) is shared by
the delivery tests of this module; the failover test that kills a master runs its own.
Every process is stopped at the end, also on failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from ssehub.cluster import ClusterBroker, slot_map
from ssehub.config import ConfigError, parse

from .conftest import StartHub
from .redis_topology import RedisCluster
from .sseclient import SSEClient, open_stream, wait_until
from .test_faults import data, gaps


def cluster_redis(cluster: RedisCluster, **more: Any) -> dict[str, Any]:
    return {"url": cluster.seeds, "reconnect_min": 0.02, "reconnect_max": 0.2, **more}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    c = RedisCluster()
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def own_cluster() -> AsyncIterator[RedisCluster]:
    """A cluster of the test's own, for tests that kill nodes."""
    c = RedisCluster()
    await asyncio.to_thread(c.start)
    try:
        yield c
    finally:
        await asyncio.to_thread(c.stop)


def received(text: str) -> Callable[[SSEClient], bool]:
    return lambda client: text in data(client)


# --- config and slot map -------------------------------------------------------------


def test_a_cluster_url_lists_seed_nodes_and_implies_cluster() -> None:
    config = parse({"channels": {"chat": {}}, "redis": {"url": "redis+cluster://a:7000,b"}})
    assert config.redis.cluster
    assert config.redis.seeds() == [("a", 7000), ("b", 6379)]
    config = parse({"channels": {"chat": {}}, "redis": {"url": "redis://a:7000", "cluster": True}})
    assert config.redis.cluster and config.redis.seeds() == [("a", 7000)]
    assert parse({"channels": {"chat": {"sharded": False}}}).channels["chat"].sharded is False


@pytest.mark.parametrize(
    ("redis", "key", "reason"),
    [
        ({"url": "redis+cluster://a:1,b:x"}, "redis.url", "'b:x'"),
        ({"url": "unix:///tmp/r.sock", "cluster": True}, "redis.url", "TCP"),
        (
            {"cluster": True, "sentinel": {"master": "m", "nodes": ["a:1"]}},
            "redis.sentinel",
            "cannot be combined",
        ),
        ({"cluster": "yes"}, "redis.cluster", "boolean"),
    ],
)
def test_bad_cluster_config_names_the_key(redis: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"channels": {"chat": {}}, "redis": redis}, source="x.yaml")
    assert err.value.key == key
    assert reason in err.value.reason


def test_the_slot_map_names_each_slots_master_and_fills_a_blank_host() -> None:
    reply = [
        [0, 99, [b"", 7000, b"id1"], [b"10.0.0.2", 7003, b"id4"]],
        [100, 16383, [b"10.0.0.1", 7001, b"id2"]],
    ]
    slots, nodes = slot_map(reply, ("seed", 7000))
    assert slots[0] == slots[99] == ("seed", 7000)
    assert slots[100] == slots[16383] == ("10.0.0.1", 7001)
    assert nodes == [("seed", 7000), ("10.0.0.2", 7003), ("10.0.0.1", 7001)]


# --- delivery --------------------------------------------------------------------------


@pytest.mark.slow
async def test_delivers_sharded_channels_from_every_master(
    cluster: RedisCluster, start_hub: StartHub
) -> None:
    names = await asyncio.to_thread(cluster.channels_on_each_master, "chan", 2)
    hub = await start_hub({n: {} for n in names}, redis=cluster_redis(cluster))
    assert isinstance(hub.broker, ClusterBroker)
    clients = [await open_stream(hub.port, f"/channels/{n}") for n in names]
    try:
        for name in names:
            assert await asyncio.to_thread(cluster.spublish, name, f"to {name}") == 1
        for name, client in zip(names, clients, strict=True):
            assert [e.data for e in await client.next_events(1)] == [f"to {name}"]
        # Each channel is subscribed on its owner and nowhere else.
        for port in await asyncio.to_thread(cluster.masters):
            on_port = await asyncio.to_thread(cluster.shard_channels, port)
            owned = [n for n in names if await asyncio.to_thread(cluster.owner, n) == port]
            assert on_port == set(owned)
    finally:
        for c in clients:
            await c.close()


@pytest.mark.slow
async def test_classic_channels_and_members_on_demand(
    cluster: RedisCluster, start_hub: StartHub
) -> None:
    members = await asyncio.to_thread(cluster.channels_on_each_master, "app:user:", 2)
    hub = await start_hub(
        {
            "user.*": {"redis_channel": "app:user:*", "grace": 0.2},
            "legacy": {"sharded": False},
        },
        redis=cluster_redis(cluster),
        juggernaut={"enabled": True},
    )
    legacy = await open_stream(hub.port, "/channels/legacy")
    clients: list[SSEClient] = []
    try:
        # Published right after the position line: the member's SSUBSCRIBE was confirmed
        # by the shard that owns it before the stream started (wait_subscribed is exact).
        for redis_name in members:
            member = redis_name.removeprefix("app:user:")
            clients.append(await open_stream(hub.port, f"/channels/user.{member}"))
            assert await asyncio.to_thread(cluster.spublish, redis_name, f"hi {member}") == 1
        for redis_name, client in zip(members, clients, strict=True):
            member = redis_name.removeprefix("app:user:")
            assert [e.data for e in await client.next_events(1)] == [f"hi {member}"]
        await asyncio.to_thread(cluster.publish, "legacy", "classic")
        await asyncio.to_thread(
            cluster.publish, "juggernaut", '{"channel": "legacy", "data": "jug"}'
        )
        assert [e.data for e in await legacy.next_events(2)] == ["classic", "jug"]
        # Members dropped after their grace are unsubscribed on their shard.
        for c in clients:
            await c.close()

        async def no_members() -> bool:
            masters = await asyncio.to_thread(cluster.masters)
            for port in masters:
                if await asyncio.to_thread(cluster.shard_channels, port):
                    return False
            return True

        await wait_until(no_members, timeout=5)
    finally:
        await legacy.close()
        for c in clients:
            await c.close()


# --- following the cluster -----------------------------------------------------------


@pytest.mark.slow
async def test_a_manual_failover_moves_channels_redis_unsubscribed(
    cluster: RedisCluster, start_hub: StartHub
) -> None:
    """``CLUSTER FAILOVER``: the old master lives on and sends ``sunsubscribe``."""
    names = await asyncio.to_thread(cluster.channels_on_each_master, "mf", 1)
    hub = await start_hub({n: {} for n in names}, redis=cluster_redis(cluster))
    moved = names[0]
    old = await asyncio.to_thread(cluster.owner, moved)
    client = await open_stream(hub.port, f"/channels/{moved}")
    try:
        await asyncio.to_thread(cluster.failover, old)
        await wait_until(lambda: hub.broker.reconnects == 1 and hub.broker.ready, timeout=15)
        assert await asyncio.to_thread(cluster.owner, moved) != old
        await client.read_until(lambda c: gaps(c))
        assert [g["reason"] for g in gaps(client)] == ["redis_outage"]
        assert await asyncio.to_thread(cluster.spublish, moved, "after") == 1
        await client.read_until(lambda c: "after" in data(c))
    finally:
        await client.close()


@pytest.mark.slow
async def test_killing_a_master_resubscribes_on_the_promoted_replica(
    own_cluster: RedisCluster, start_hub: StartHub
) -> None:
    cluster = own_cluster
    names = await asyncio.to_thread(cluster.channels_on_each_master, "kill", 1)
    hub = await start_hub({n: {} for n in names}, redis=cluster_redis(cluster))
    clients = [await open_stream(hub.port, f"/channels/{n}") for n in names]
    try:
        victim = await asyncio.to_thread(cluster.owner, names[0])
        await asyncio.to_thread(cluster.kill, victim)
        await asyncio.to_thread(cluster.wait_stable, 20)
        await wait_until(lambda: hub.broker.reconnects == 1 and hub.broker.ready, timeout=15)
        for name, client in zip(names, clients, strict=True):
            await client.read_until(lambda c: gaps(c))
            assert await asyncio.to_thread(cluster.spublish, name, f"after {name}") == 1
            await client.read_until(received(f"after {name}"))
    finally:
        for c in clients:
            await c.close()
