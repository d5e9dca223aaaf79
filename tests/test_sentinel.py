"""Redis Sentinel: the master found through the sentinels, and found again after a failover.

Each test runs its own master, replica and three sentinels on free loopback ports,
and stops them all in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from ssehub.config import ConfigError, parse
from ssehub.redis.factory import create_presence_reader, create_replays
from ssehub.redis.pubsub import BrokerState
from ssehub.redis.sentinel import SentinelBroker

from .conftest import StartHub, hub_config
from .logcheck import rendered
from .redis_server import RedisServer, free_port
from .redis_topology import SentinelSetup
from .sseclient import open_stream, wait_until
from .test_faults import data, gaps
from .test_redis_events import events_config, events_heard, running_writer
from .test_redis_side import ends_by_itself


def sentinel_redis(setup: SentinelSetup, **more: Any) -> dict[str, Any]:
    return {
        "sentinel": {"master": setup.name, "nodes": setup.nodes},
        "reconnect_min": 0.02,
        "reconnect_max": 0.2,
        **more,
    }


@pytest.fixture
async def sentinels() -> AsyncIterator[SentinelSetup]:
    setup = SentinelSetup()
    await asyncio.to_thread(setup.start)
    try:
        yield setup
    finally:
        await asyncio.to_thread(setup.stop)


@pytest.mark.parametrize(
    ("sentinel", "key", "reason"),
    [
        ({"master": "m", "nodes": ["127.0.0.1"]}, "redis.sentinel.nodes[0]", "host:port"),
        ({"master": "m", "nodes": ["h:1", "h:x"]}, "redis.sentinel.nodes[1]", "'h:x'"),
        ({"master": "m", "nodes": []}, "redis.sentinel.nodes", "must not be empty"),
        ({"master": "", "nodes": ["h:1"]}, "redis.sentinel.master", "must not be empty"),
        ({"nodes": ["h:1"]}, "redis.sentinel.master", "required"),
        ({"master": "m", "nodes": ["h:1"], "port": 1}, "redis.sentinel.port", "unknown key"),
    ],
)
def test_bad_sentinel_config_names_the_key(sentinel: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"channels": {"chat": {}}, "redis": {"sentinel": sentinel}}, source="x.yaml")
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(err.value).startswith(f"x.yaml: {key}: ")


def test_sentinel_config_keeps_the_nodes_in_order() -> None:
    config = parse(
        {
            "channels": {"chat": {}},
            "redis": {"sentinel": {"master": "m", "nodes": ["a:26379", "[::1]:26380"]}},
        }
    )
    assert config.redis.sentinel is not None
    assert config.redis.sentinel.addresses() == [("a", 26379), ("::1", 26380)]


@pytest.mark.slow
async def test_follows_a_failover_and_signals_the_gap(
    sentinels: SentinelSetup, start_hub: StartHub
) -> None:
    hub = await start_hub(redis=sentinel_redis(sentinels))
    assert isinstance(hub.broker, SentinelBroker)
    client = await open_stream(hub.port, "/channels/chat")
    try:
        await asyncio.to_thread(sentinels.publish, "chat", "before")
        await client.next_events(1)
        old = sentinels.master.port
        await asyncio.to_thread(sentinels.master.kill)
        new = await asyncio.to_thread(sentinels.wait_promoted, old, 20)
        await wait_until(lambda: hub.broker.reconnects == 1 and hub.broker.ready, timeout=10)
        assert hub.broker.master == ("127.0.0.1", new)
        await client.read_until(lambda c: gaps(c))
        assert [g["reason"] for g in gaps(client)] == ["redis_outage"]
        assert await asyncio.to_thread(sentinels.publish, "chat", "after") == 1
        await client.read_until(lambda c: "after" in data(c))
        assert data(client) == ["before", "after"]
    finally:
        await client.close()


@pytest.mark.slow
async def test_a_manual_failover_moves_the_subscription(
    sentinels: SentinelSetup, start_hub: StartHub
) -> None:
    """``SENTINEL FAILOVER``: the old master stays up, demoted to a replica."""
    hub = await start_hub(redis=sentinel_redis(sentinels))
    client = await open_stream(hub.port, "/channels/chat")
    try:
        old = sentinels.master.port
        await asyncio.to_thread(sentinels.failover)
        new = await asyncio.to_thread(sentinels.wait_promoted, old, 20)
        await wait_until(lambda: hub.broker.reconnects == 1 and hub.broker.ready, timeout=10)
        assert hub.broker.master == ("127.0.0.1", new)
        await client.read_until(lambda c: gaps(c))
        await asyncio.to_thread(sentinels.publish, "chat", "on the new master")
        await client.read_until(lambda c: "on the new master" in data(c))
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def scripted_sentinel(
    answers: list[tuple[str, int]], watched: int
) -> AsyncIterator[SentinelBroker]:
    """A running SentinelBroker whose sentinels answer ``answers[0]``; the watch on ``watched``."""
    sentinel = {"master": "m", "nodes": [f"127.0.0.1:{watched}"]}
    config = hub_config("", redis={"sentinel": sentinel, "reconnect_max": 0.2}).redis
    broker = SentinelBroker(config, [b"chat"], lambda c, p: None)

    async def resolve() -> tuple[str, int]:
        return answers[0]

    broker.resolve = resolve  # type: ignore[method-assign]
    task = asyncio.create_task(broker.run())
    try:
        yield broker
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.slow
async def test_switch_master_on_a_sentinel_moves_the_subscription(
    redis_server: RedisServer,
) -> None:
    """Only +switch-master says it here: the old master neither dies nor kills clients."""
    old, new = RedisServer(), RedisServer()
    old.start()
    new.start()
    # The session Redis plays the sentinel the broker watches: its pub/sub is all it needs.
    publisher = aioredis.Redis.from_url(redis_server.url)
    try:
        answers = [("127.0.0.1", old.port)]
        async with scripted_sentinel(answers, redis_server.port) as broker:
            await wait_until(lambda: broker.ready, timeout=5)

            async def watched() -> bool:
                numsub = await publisher.pubsub_numsub("+switch-master")
                return bool(numsub[0][1])

            await wait_until(watched, timeout=5)
            answers[0] = ("127.0.0.1", new.port)
            await publisher.publish(
                "+switch-master", f"m 127.0.0.1 {old.port} 127.0.0.1 {new.port}"
            )
            await wait_until(lambda: broker.reconnects == 1 and broker.ready, timeout=5)
            assert broker.master == ("127.0.0.1", new.port)
    finally:
        await publisher.aclose()
        new.stop()
        old.stop()


@pytest.mark.slow
async def test_a_replica_named_as_master_is_never_subscribed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sentinel may lag behind a failover: ROLE decides, not the sentinel's answer."""
    caplog.set_level(logging.WARNING, logger="ssehub.redis.pubsub")
    master, replica = RedisServer(), RedisServer()
    master.start()
    try:
        replica.args = ("--replicaof", "127.0.0.1", str(master.port))
        replica.start()
        answers = [("127.0.0.1", replica.port)]
        async with scripted_sentinel(answers, free_port()) as broker:
            await wait_until(lambda: "not a master" in rendered(caplog), timeout=5)
            assert broker.state is BrokerState.CONNECTING
            answers[0] = ("127.0.0.1", master.port)
            await wait_until(lambda: broker.ready, timeout=5)
    finally:
        replica.stop()
        master.stop()


@pytest.mark.slow
async def test_a_stream_channel_through_sentinel_loses_nothing_in_a_failover(
    sentinels: SentinelSetup, start_hub: StartHub
) -> None:
    """The stream reader finds the master through the sentinels too, and goes on from
    its position on the promoted replica: entries before and after, none lost, no gap."""
    hub = await start_hub(
        {"orders": {"stream": "sentinel:orders"}},
        redis=sentinel_redis(sentinels),
        wait_ready=False,
    )
    await wait_until(lambda: hub.ready, timeout=10)
    client = await open_stream(hub.port, "/channels/orders")

    def xadd(data: str) -> str:
        with redis.Redis(port=sentinels.master_port()) as r:
            entry_id = r.xadd("sentinel:orders", {"data": data}).decode()
            r.wait(1, 2000)  # on the replica too, before the master goes
            return entry_id

    try:
        sent = [await asyncio.to_thread(xadd, "before")]
        await client.next_events(1)
        old = sentinels.master.port
        await asyncio.to_thread(sentinels.master.kill)
        await asyncio.to_thread(sentinels.wait_promoted, old, 20)
        sent.append(await asyncio.to_thread(xadd, "after"))
        events = await client.next_events(2, timeout=15)
        assert [e.id for e in events] == sent
        assert not gaps(client)
    finally:
        await client.close()


@pytest.mark.slow
async def test_writer_presence_and_replay_reads_follow_the_master(
    sentinels: SentinelSetup,
) -> None:
    """Issue 19, defect 4: the events/presence writer and reader and the workers' replay
    reads used redis.url (127.0.0.1:6379 by default), not the sentinels' master. Built
    by the factory, each finds the master through the sentinels. And after a failover
    the replay reads go to the new master at once: the old one lives on as a replica
    that answers reads with what it had, and a resume reading there would skip the
    entries it lacks (an empty page moves the client to the live position)."""
    config = events_config(sentinel_redis(sentinels), {"room.*": {"presence": True}})
    reader = create_presence_reader(config.redis)
    replays = create_replays(config.redis)
    replaying = asyncio.create_task(replays.run())
    old = await asyncio.to_thread(sentinels.master_port)
    try:
        async with running_writer(config, "snode") as writer, events_heard(old) as heard:
            writer.join("room.a", "s1", None, True)
            await wait_until(lambda: heard == ["s1"], 10)

            async def written() -> bool:
                return bool((await reader.page("room.a", 0, 10))["count"])

            # The writer stores presence after it published the event: heard first.
            await wait_until(written, timeout=10)
            assert (await reader.page("room.a", 0, 10))["count"] == 1
        with redis.Redis(port=old) as r:
            first = r.xadd("s:replay", {"data": "one"}).decode()
        entries = await replays.read_range(b"s:replay", b"0-0", b"+", 9)
        assert [e[0].decode() for e in entries] == [first]
        await asyncio.to_thread(sentinels.failover)
        new = await asyncio.to_thread(sentinels.wait_promoted, old, 20)
        with redis.Redis(port=new) as r:
            second = r.xadd("s:replay", {"data": "two"}).decode()
        # As a resume reads: from its position up to the live reader's.
        entries = await replays.read_range(b"s:replay", first.encode(), second.encode(), 9)
        assert [e[0].decode() for e in entries] == [second]
    finally:
        await reader.close()
        replaying.cancel()
        await asyncio.gather(replaying, return_exceptions=True)


async def test_a_sentinel_watch_that_dies_ends_the_broker_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 19: the +switch-master watch was a task nobody watched; an exception other
    than a network fault ended it silently (and with it, failovers announced by the
    sentinels). Now the broker's run() raises it, for the process's task owner."""
    dead = [f"127.0.0.1:{free_port()}"]
    config = parse(
        {"channels": {"chat": {}}, "redis": {"sentinel": {"master": "m", "nodes": dead}}}
    ).redis

    async def broken(self: Any, addr: Any) -> None:
        raise ValueError("a bug in the watch")

    monkeypatch.setattr(SentinelBroker, "_watch_one", broken)
    broker = SentinelBroker(config, ["chat"], lambda channel, payload: None)
    await ends_by_itself(broker.run(), ValueError, "a bug in the watch", 5)
