"""The control plane on a real Redis Cluster (three masters, a replica each):
POST /publish SPUBLISHes and XADDs on the owning master (idempotently), and a
disconnect with a refusal reaches both nodes through classic pub/sub, the refusals'
sorted set living on one master."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from .conftest import StartHub
from .redis_topology import RedisCluster
from .sseclient import SSEClient, http_request, open_stream, wait_until
from .test_control import CHANNELS, ended_with, user_stream, user_token
from .test_control import auth as auth
from .test_publish import ADMIN, post
from .test_publish import http as http
from .test_publish import publish_key as publish_key

pytestmark = pytest.mark.slow


def cluster_redis(cluster: RedisCluster) -> dict[str, Any]:
    return {"url": cluster.seeds, "reconnect_min": 0.02, "reconnect_max": 0.2}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    c = RedisCluster()
    c.start()
    try:
        yield c
    finally:
        c.stop()


async def test_on_a_cluster_publish_spublishes_and_xadds_on_the_owning_master(
    cluster: RedisCluster,
    start_hub: StartHub,
    publish_key: dict[str, Any],
    http: aiohttp.ClientSession,
) -> None:
    names = await asyncio.to_thread(cluster.channels_on_each_master, "pubc", 1)
    channels: dict[str, Any] = {n: {} for n in names}
    channels["legacy"] = {"sharded": False}
    channels["orders"] = {"stream": "{orders}:all"}
    hub = await start_hub(
        channels,
        redis=cluster_redis(cluster),
        admin=ADMIN,
        publish=publish_key,
    )
    await wait_until(lambda: hub.ready, timeout=10)
    clients = [await open_stream(hub.port, f"/channels/{n}") for n in [*names, "legacy", "orders"]]
    try:
        body = [{"channel": n, "data": f"to {n}"} for n in [*names, "legacy", "orders"]]
        for attempt in range(2):  # the second time, replayed from the stored answers
            status, answer, headers = await post(
                http, hub.admin_port, body, {"Idempotency-Key": "c"}
            )
            assert status == 200, answer
            assert ("Idempotent-Replayed" in headers) == bool(attempt)
        results = answer["results"]
        assert [r.get("receivers") for r in results[: len(names)]] == [1] * len(names)
        # A classic PUBLISH counts the receivers on the node it reached only.
        assert isinstance(results[-2]["receivers"], int)
        assert results[-1]["id"]
        for client, name in zip(clients, [*names, "legacy", "orders"], strict=True):
            assert [e.data for e in await client.next_events(1)] == [f"to {name}"]
        # One message per request goes without a pipeline: routed by its channel too.
        for client, name in zip(clients, names, strict=False):
            status, answer, _ = await post(http, hub.admin_port, {"channel": name, "data": "one"})
            assert (status, answer) == (200, {"channel": name, "receivers": 1})
            await client.next_events(2)
        for client, name in zip(clients, names, strict=False):
            await cluster_publish_marker(cluster, name)
            await client.read_until(lambda c: c.events[-1].data == "marker")
            assert [e.data for e in client.events] == [f"to {name}", "one", "marker"]
    finally:
        for client in clients:
            await client.close()


async def cluster_publish_marker(cluster: RedisCluster, channel: str) -> None:
    assert await asyncio.to_thread(cluster.spublish, channel, "marker") == 1


async def test_on_a_cluster_a_refusing_disconnect_reaches_every_node(
    cluster: RedisCluster,
    start_hub: StartHub,
    auth: dict[str, Any],
    publish_key: dict[str, Any],
    http: aiohttp.ClientSession,
) -> None:
    nodes = [
        await start_hub(
            CHANNELS, redis=cluster_redis(cluster), auth=auth, admin=ADMIN, publish=publish_key
        )
        for _ in range(2)
    ]
    clients: list[SSEClient] = []
    try:
        clients = [await user_stream(n.port, "42") for n in nodes]
        body = {"disconnect": {"user": "42", "reason": "bye", "reconnect": False}}
        status, answer, _ = await post(http, nodes[0].admin_port, body, path="/disconnect")
        # (A classic PUBLISH on a Cluster counts the listeners of the node it reached.)
        assert status == 200 and isinstance(answer["nodes"], int), answer
        for client in clients:
            await ended_with(client, "bye", reconnect=False)
        headers = {"Authorization": f"Bearer {user_token('42')}"}
        for node in nodes:
            assert (await http_request(node.port, "/channels/user.42", headers=headers))[0] == 403
        # Kept in the cluster: a node that starts now reads it.
        late = await start_hub(CHANNELS, redis=cluster_redis(cluster), auth=auth)
        await wait_until(lambda: late.control.refused_until("42", ""), 10)
    finally:
        for client in clients:
            await client.close()
