"""``workers: N`` on Sentinel and on Redis Cluster: the workers' main builds the same
Redis side as a single process (node.py, through the Redis layer's factory), so every
topology works in both process models (issue 19, defect 4)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .hubprocess import WORKERS, Node
from .sseclient import SSEClient, open_stream, wait_until
from .test_metrics import one, scrape
from .topologies import ClusterTopology, SentinelTopology, Topology

pytestmark = pytest.mark.slow

# Streams opened to reach every worker (see test_workers.SPREAD).
SPREAD = 12
TAG = "{wt}"  # every key and channel on one cluster slot


def start(tmp_path: Path, topology: Topology, **redis: Any) -> Node:
    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "redis": {**topology.redis_config(), **redis},
        "workers": WORKERS,
        "admin": {"port": 0},
        "shutdown_timeout": 3,
        "channels": {
            "chat": {"redis_channel": f"{TAG}:chat"},
            "log": {"stream": f"{TAG}:log"},
            "user.*": {"redis_channel": f"{TAG}:user:*"},
        },
    }
    path = tmp_path / "hub.yaml"
    path.write_text(json.dumps(config))  # (YAML reads JSON)
    return Node(path)


@pytest.fixture
def node_on(tmp_path: Path) -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for n in started:
        n.stop()


async def on_every_worker(node: Node, clients: list[SSEClient], path: str) -> list[SSEClient]:
    """``SPREAD`` streams of ``path``, once the node's metrics show every worker holds some."""
    new = [await open_stream(node.port, path) for _ in range(SPREAD)]
    clients.extend(new)

    async def spread() -> bool:
        m = await scrape(node.admin_port)
        per = [one(m, "ssehub_worker_connections", worker=str(i)) for i in range(WORKERS)]
        return sum(per) >= SPREAD and all(per)

    await wait_until(spread, timeout=10)
    return new


async def check_every_kind(node: Node, topology: Topology, clients: list[SSEClient]) -> None:
    """A published message, a stream entry and a family member's message reach streams
    on every worker; Redis is up for the node."""
    chat = await on_every_worker(node, clients, "/channels/chat")
    log = await on_every_worker(node, clients, "/channels/log")
    member = await on_every_worker(node, clients, "/channels/user.7")
    await asyncio.to_thread(topology.publish, f"{TAG}:chat", ["hello"])
    (entry,) = await asyncio.to_thread(topology.xadd, f"{TAG}:log", ["logged"])
    await asyncio.to_thread(topology.publish, f"{TAG}:user:7", ["to seven"])
    for c in chat:
        assert [e.data for e in await c.next_events(1)] == ["hello"]
    for c in log:
        assert [(e.id, e.data) for e in await c.next_events(1)] == [(entry, "logged")]
    for c in member:
        assert [e.data for e in await c.next_events(1)] == ["to seven"]
    m = await scrape(node.admin_port)
    assert one(m, "ssehub_redis_up") == 1
    assert one(m, "ssehub_workers") == WORKERS
    assert not node.errors(), node.errors()


async def test_workers_on_sentinel_follow_the_master_the_sentinels_name(
    tmp_path: Path,
    sentinel_topology: SentinelTopology,
    node_on: list[Node],
    clients: list[SSEClient],
) -> None:
    # (redis.url is a decoy nothing listens on: the sentinels say where the master is.)
    node = await asyncio.to_thread(start, tmp_path, sentinel_topology)
    node_on.append(node)
    await check_every_kind(node, sentinel_topology, clients)


@pytest.mark.parametrize("seed", ["redis+cluster", "cluster: true"])
async def test_workers_on_a_cluster_read_sharded_channels_and_streams(
    tmp_path: Path,
    cluster_topology: ClusterTopology,
    node_on: list[Node],
    clients: list[SSEClient],
    seed: str,
) -> None:
    """Seeded by every node (``redis+cluster://``) or by one (``cluster: true`` and a
    plain URL); channels are sharded (``SPUBLISH``), as a cluster's are by default."""
    cluster = cluster_topology.cluster
    redis: dict[str, Any] = {}
    if seed != "redis+cluster":
        redis = {"url": f"redis://127.0.0.1:{cluster.live[0]}/0", "cluster": True}
    node = await asyncio.to_thread(start, tmp_path, cluster_topology, **redis)
    node_on.append(node)
    await check_every_kind(node, cluster_topology, clients)
