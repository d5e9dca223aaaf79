"""Redis Cluster: sharded pub/sub and stream channels on the master owning each channel
or stream key, following failovers.

A real cluster (three masters, a replica each, on free loopback ports) is shared by
the delivery tests of this module; the failover test that kills a master runs its own.
Every process is stopped at the end, also on failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from ssehub.config import ConfigError, parse
from ssehub.redis.cluster import ClusterBroker, _Node, slot_map
from ssehub.redis.cluster_streams import ClusterStreamReader, _SlotReader
from ssehub.redis.factory import create_presence_reader, create_replays
from ssehub.server import HubServer

from .conftest import StartHub
from .redis_topology import RedisCluster
from .sseclient import SSEClient, open_stream, wait_until
from .test_faults import data, gaps
from .test_redis_events import events_config, events_heard, running_writer
from .test_redis_side import ends_by_itself
from .topologies import ClusterTopology


def cluster_redis(cluster: RedisCluster, **more: Any) -> dict[str, Any]:
    return {"url": cluster.seeds, "reconnect_min": 0.02, "reconnect_max": 0.2, **more}


@pytest.fixture
def cluster(cluster_topology: ClusterTopology) -> RedisCluster:
    """The session's cluster (shared with tests/test_matrix.py), every master with its
    replica again if a test before killed one."""
    cluster_topology.heal()
    return cluster_topology.cluster


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
                on_port = await asyncio.to_thread(cluster.shard_channels, port)
                if any(c.startswith("app:user:") for c in on_port):
                    return False
            return True

        await wait_until(no_members, timeout=5)
    finally:
        await legacy.close()
        for c in clients:
            await c.close()


@pytest.mark.slow
@pytest.mark.parametrize("flushed_first", [False, True])
async def test_a_member_wanted_again_in_the_batch_that_drops_it_is_subscribed(
    cluster: RedisCluster, flushed_first: bool
) -> None:
    """Issue 19, defect 2, on Cluster: drop then want within one 10 ms batch."""
    got: list[bytes] = []
    config = parse({"channels": {"a": {}}, "redis": cluster_redis(cluster)}).redis
    broker = ClusterBroker(config, ["keep"], lambda channel, payload: got.append(payload))
    task = asyncio.create_task(broker.run())
    try:
        await wait_until(lambda: broker.ready or task.done(), timeout=10)
        broker.want([b"member"])
        assert await broker.wait_subscribed([b"member"], 5)
        if flushed_first:
            broker.want([b"other"])
            await asyncio.sleep(0)
        broker.drop([b"member"])
        await asyncio.sleep(0)
        broker.want([b"member"])
        assert await broker.wait_subscribed([b"member"], 2)
        assert await asyncio.to_thread(cluster.spublish, "member", "still here") == 1
        await wait_until(lambda: b"still here" in got, timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


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


# --- stream channels ---------------------------------------------------------------------


def xadd(cluster: RedisCluster, key: str, data: str, replicated: bool = False) -> str:
    """``XADD`` on the master owning ``key``; ``replicated``: ``WAIT 1 2000`` after it, so
    the entry is on the replica before anything happens to the master."""
    with redis.Redis(port=cluster.owner(key), socket_timeout=5) as r:
        entry_id = r.xadd(key, {"data": data}).decode()
        if replicated:
            assert r.wait(1, 2000) == 1
        return entry_id


def keyslot(cluster: RedisCluster, key: str) -> int:
    with redis.Redis(port=cluster.live[0], socket_timeout=5) as r:
        return int(r.execute_command("CLUSTER", "KEYSLOT", key))  # type: ignore[no-untyped-call]


def blocked_xreads(port: int) -> int:
    """Connections of ``port`` blocked in XREAD now."""
    with redis.Redis(port=port, socket_timeout=5) as r:
        clients = r.client_list()
    return sum(1 for c in clients if c["cmd"] == "xread" and "b" in c["flags"])


async def start_stream_hub(
    start_hub: StartHub, cluster: RedisCluster, channels: dict[str, Any], **more: Any
) -> HubServer:
    hub = await start_hub(channels, redis=cluster_redis(cluster), wait_ready=False, **more)
    await wait_until(lambda: hub.ready, timeout=15)
    assert isinstance(hub.streams, ClusterStreamReader)
    return hub


@pytest.mark.slow
async def test_stream_channels_are_read_on_the_master_owning_each_key(
    cluster: RedisCluster, start_hub: StartHub
) -> None:
    """Keys on all three masters (as ``CLUSTER KEYSLOT`` places them) each deliver their
    entries with their ids; each slot in use has one reader on its owner, and keys
    sharing a hash tag share one blocking XREAD."""
    spread = await asyncio.to_thread(cluster.channels_on_each_master, "cs:orders:", 2)
    tagged = ["{cs:acct}:1", "{cs:acct}:2", "{cs:acct}:3"]
    keys = spread + tagged
    owners = {k: await asyncio.to_thread(cluster.owner, k) for k in keys}
    slots = {k: await asyncio.to_thread(keyslot, cluster, k) for k in keys}
    assert len(set(owners[k] for k in spread)) == 3  # every master serves some
    assert len({slots[k] for k in tagged}) == 1
    names = {k: f"s{i}" for i, k in enumerate(keys)}
    hub = await start_stream_hub(start_hub, cluster, {n: {"stream": k} for k, n in names.items()})
    clients = {k: await open_stream(hub.port, f"/channels/{n}") for k, n in names.items()}
    try:
        sent = {k: await asyncio.to_thread(xadd, cluster, k, f"to {k}") for k in keys}
        for k, client in clients.items():
            events = await client.next_events(1)
            assert [(e.id, e.data) for e in events] == [(sent[k], f"to {k}")]
        readers = hub.streams._readers  # type: ignore[union-attr]
        assert set(readers) == set(slots.values())
        for k in keys:
            assert readers[slots[k]].addr[1] == owners[k]

        # One blocked XREAD per slot in use on each master: the three tagged keys, one.
        def xreads_match() -> bool:
            return all(
                blocked_xreads(port) == len({slots[k] for k in keys if owners[k] == port})
                for port in set(owners.values())
            )

        await wait_until(lambda: asyncio.to_thread(xreads_match), timeout=10)
    finally:
        for c in clients.values():
            await c.close()


@pytest.mark.slow
async def test_a_member_whose_key_is_no_stream_ends_alone_on_its_slot_reader(
    cluster: RedisCluster, start_hub: StartHub
) -> None:
    """Issue 19, defect 1, on Cluster: the bad key shares its slot (a hash tag) with a
    good member's key, so both would be in one XREAD; only the bad one's stream ends."""

    def setup() -> None:
        with redis.Redis(port=cluster.owner("{cs:fam}:evil"), socket_timeout=5) as r:
            r.delete("{cs:fam}:evil", "{cs:fam}:good")
            r.set("{cs:fam}:evil", "not a stream")

    await asyncio.to_thread(setup)
    hub = await start_stream_hub(
        start_hub, cluster, {"fam.*": {"stream": "{cs:fam}:*"}, "news": {"stream": "cs:news"}}
    )
    news = await open_stream(hub.port, "/channels/news")
    good = await open_stream(hub.port, "/channels/fam.good")
    evil = await SSEClient.connect(hub.port, "/channels/fam.evil")
    try:
        await evil.read_to_eof(timeout=10)
        assert evil.ended_cleanly
        assert hub.hub.stats.stream_errors["fam.*"] == 1
        sent = await asyncio.to_thread(xadd, cluster, "{cs:fam}:good", "good after")
        await asyncio.to_thread(xadd, cluster, "cs:news", "news after")
        assert [(e.id, e.data) for e in await good.next_events(1)] == [(sent, "good after")]
        assert [e.data for e in await news.next_events(1)] == ["news after"]
        assert hub.ready and hub.streams.reconnects == 0
    finally:
        for c in (news, good, evil):
            await c.close()


@pytest.mark.slow
async def test_a_stream_resume_older_than_the_cache_reads_the_owning_master(
    cluster: RedisCluster, start_hub: StartHub
) -> None:
    """``history: 2``: a client 10 entries back is caught up with XRANGE on the master
    that owns the key (any other would answer MOVED), then goes live."""
    key = (await asyncio.to_thread(cluster.channels_on_each_master, "cs:deep:", 1))[-1]
    hub = await start_stream_hub(start_hub, cluster, {"deep": {"stream": key, "history": 2}})
    first = await asyncio.to_thread(xadd, cluster, key, "seen")
    missed = [await asyncio.to_thread(xadd, cluster, key, f"missed {i}") for i in range(10)]
    await wait_until(lambda: hub.hub.channels["deep"].stream_pos == missed[-1])
    back = await SSEClient.connect(hub.port, "/channels/deep", {"Last-Event-ID": first})
    try:
        await back.next_events(10)
        live = await asyncio.to_thread(xadd, cluster, key, "live")
        events = await back.next_events(11)
        assert [e.id for e in events] == [*missed, live]
        assert not gaps(back)
        assert hub.hub.stats.redis_replays["deep"] == 1
    finally:
        await back.close()


@pytest.mark.slow
async def test_killing_a_master_loses_no_stream_entry_and_signals_no_gap(
    own_cluster: RedisCluster, start_hub: StartHub
) -> None:
    """A master killed, its replica promoted: the stream read there goes on from its last
    entry on the promoted replica. Entries before (replicated with WAIT), during (on the
    other masters) and after the promotion: every one exactly once, and no gap event."""
    cluster = own_cluster
    keys = await asyncio.to_thread(cluster.channels_on_each_master, "cs:kill:", 1)
    names = {k: f"s{i}" for i, k in enumerate(keys)}
    hub = await start_stream_hub(start_hub, cluster, {n: {"stream": k} for k, n in names.items()})
    streams = hub.streams
    assert isinstance(streams, ClusterStreamReader)
    clients = {k: await open_stream(hub.port, f"/channels/{n}") for k, n in names.items()}
    sent: dict[str, list[str]] = {k: [] for k in keys}
    try:
        for k in keys:
            for i in range(3):
                sent[k].append(await asyncio.to_thread(xadd, cluster, k, f"before {i}", True))
        for client in clients.values():
            await client.next_events(3)
        victim = await asyncio.to_thread(cluster.owner, keys[0])
        await asyncio.to_thread(cluster.kill, victim)
        for k in keys[1:]:  # the other shards go on meanwhile
            sent[k].append(await asyncio.to_thread(xadd, cluster, k, "during"))
        await asyncio.to_thread(cluster.wait_stable, 20)
        promoted = await asyncio.to_thread(cluster.owner, keys[0])
        assert promoted != victim
        for k in keys:
            for i in range(3):
                sent[k].append(await asyncio.to_thread(xadd, cluster, k, f"after {i}"))
        for k, client in clients.items():
            events = await client.next_events(len(sent[k]), timeout=20)
            assert [e.id for e in events] == sent[k], k
        await wait_until(lambda: streams.ready and streams.reconnects >= 1, timeout=10)
        assert streams._readers[key_slot(keys[0].encode())].addr[1] == promoted
        # Nothing more arrives, no gap, no duplicate: an entry added last on each key is
        # the next event, and the only one, after those sent; and after it, reading on
        # for a while, nothing at all.
        for k in keys:
            sent[k].append(await asyncio.to_thread(xadd, cluster, k, "last"))
        for k, client in clients.items():
            await client.next_events(len(sent[k]))
        late = await asyncio.gather(*(c.read_for(0.3) for c in clients.values()))
        for (k, client), after in zip(clients.items(), late, strict=True):
            assert [(e.event, e.id) for e in client.events] == [("message", i) for i in sent[k]]
            assert after == []
    finally:
        for c in clients.values():
            await c.close()


@pytest.mark.slow
async def test_a_manual_failover_moves_a_stream_reader_without_loss_or_gap(
    cluster: RedisCluster, start_hub: StartHub
) -> None:
    """``CLUSTER FAILOVER``: the old master lives on as a replica and turns the reader
    away; the reader moves to the promoted replica and goes on from its last entry."""
    key = (await asyncio.to_thread(cluster.channels_on_each_master, "cs:mf:", 1))[0]
    hub = await start_stream_hub(start_hub, cluster, {"mf": {"stream": key}})
    streams = hub.streams
    assert isinstance(streams, ClusterStreamReader)
    client = await open_stream(hub.port, "/channels/mf")
    try:
        sent = [await asyncio.to_thread(xadd, cluster, key, "before", True)]
        await client.next_events(1)
        old = await asyncio.to_thread(cluster.owner, key)
        await asyncio.to_thread(cluster.failover, old)
        new = await asyncio.to_thread(cluster.owner, key)
        assert new != old
        sent.append(await asyncio.to_thread(xadd, cluster, key, "after"))
        events = await client.next_events(2, timeout=15)
        assert [e.id for e in events] == sent
        await wait_until(lambda: streams._readers[key_slot(key.encode())].addr[1] == new)
        assert not gaps(client)
    finally:
        await client.close()


# --- the other roles: events/presence writer and reader, replay reads ----------------


@pytest.mark.slow
async def test_events_and_presence_are_written_and_read_on_a_cluster(cluster: RedisCluster) -> None:
    """Issue 19, defect 4: with a cluster URL the writer task died (redis-py's cluster
    pipeline refuses PUBLISH) and the presence reader could not connect."""
    config = events_config(cluster_redis(cluster), {"room.*": {"presence": True}})
    rooms = await asyncio.to_thread(cluster.channels_on_each_master, "room.", 1)
    reader = create_presence_reader(config.redis)
    try:
        async with (
            events_heard(cluster.live[-1]) as heard,
            running_writer(config, "cnode") as writer,
        ):
            for i, room in enumerate(rooms):
                writer.join(room, f"s{i}", {"n": i}, True)
            await wait_until(lambda: sorted(heard) == [f"s{i}" for i in range(len(rooms))], 10)
            for i, room in enumerate(rooms):

                async def written(room: str = room) -> bool:
                    return bool((await reader.page(room, 0, 10))["count"])

                # The writer stores presence after it published the events: heard first.
                await wait_until(written, timeout=10)
                page = await reader.page(room, 0, 10)
                assert page["count"] == 1, page
                member = {"session_id": f"s{i}", "node": "cnode", "meta": {"n": i}}
                assert page["members"] == [member]
    finally:
        await reader.close()


@pytest.mark.slow
async def test_replay_reads_go_to_the_master_owning_each_key(cluster: RedisCluster) -> None:
    """Issue 19, defect 4: a worker's replay reads (XRANGE) used a plain client on the
    cluster URL; the factory's replay reader reads each key on its owner."""
    config = parse({"channels": {"a": {}}, "redis": cluster_redis(cluster)}).redis
    keys = await asyncio.to_thread(cluster.channels_on_each_master, "cs:replay:", 1)
    sent = {
        k: [await asyncio.to_thread(xadd, cluster, k, f"{k} {i}") for i in range(3)] for k in keys
    }
    replays = create_replays(config)
    running = asyncio.create_task(replays.run())
    try:
        for k in keys:
            entries = await replays.read_range(k.encode(), b"0-0", b"+", 10)
            assert [e[0].decode() for e in entries] == sent[k]
            assert await replays.first_id(k.encode()) == sent[k][0].encode()
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["pubsub", "streams"])
async def test_a_part_that_dies_ends_the_cluster_source_loudly(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """Issue 19: a node's (a slot reader's) task that ended on an exception was never
    heard of: ClusterBroker.run / ClusterStreamReader.run went on without it. Now the
    source's run() raises it, for the process's task owner to act on."""
    config = parse({"channels": {"a": {}}, "redis": cluster_redis(cluster)}).redis

    async def broken(self: Any) -> None:
        raise RuntimeError("a bug in a part")

    role: Any
    if source == "pubsub":
        monkeypatch.setattr(_Node, "run", broken)
        role = ClusterBroker(config, ["a"], lambda channel, payload: None)
    else:
        monkeypatch.setattr(_SlotReader, "run", broken)
        role = ClusterStreamReader(config, print, print, lambda key: 0)
        role.want([b"cs:part"])
    await ends_by_itself(role.run(), RuntimeError, "a bug in a part", 10)


@pytest.mark.slow
async def test_a_listed_channels_key_fixed_on_its_master_serves_again_without_a_reload(
    cluster: RedisCluster, start_hub: StartHub
) -> None:
    """A listed channel's key that holds no stream is asked for again at each heartbeat
    on its slot's reader, and serves once fixed (as in one Redis)."""
    key = "cs:listed"

    def owner() -> redis.Redis:
        return redis.Redis(port=cluster.owner(key), socket_timeout=5)

    def break_it() -> None:
        with owner() as r:
            r.delete(key)
            r.set(key, "not a stream")

    def fix_it() -> str:
        with owner() as r, r.pipeline(transaction=True) as fix:
            fix.delete(key)
            fix.xadd(key, {"data": "first"})
            return str(fix.execute()[1].decode())

    await asyncio.to_thread(break_it)
    hub = await start_stream_hub(start_hub, cluster, {"listed": {"stream": key}}, heartbeat=0.2)
    c = await SSEClient.connect(hub.port, "/channels/listed")
    try:
        assert c.status == 200
        await wait_until(lambda: hub.hub.stats.stream_errors["listed"] >= 2, timeout=10)
        assert c.parser.last_id == ""
        first = await asyncio.to_thread(fix_it)
        await c.read_until(lambda c: c.parser.last_id == first, timeout=10)
        sent = await asyncio.to_thread(xadd, cluster, key, "after the fix")
        assert [(e.id, e.data) for e in await c.next_events(1)] == [(sent, "after the fix")]
    finally:
        await c.close()
