"""One Redis layer: every role comes from ssehub/redis/factory.py, for every topology,
and no module outside ssehub/redis builds a Redis client or connection."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from ssehub.config import parse
from ssehub.hub.control import Control
from ssehub.redis import factory
from ssehub.redis.cluster import ClusterBroker
from ssehub.redis.cluster_streams import ClusterStreamReader
from ssehub.redis.pubsub import Broker
from ssehub.redis.sentinel import SentinelBroker
from ssehub.redis.source import Source
from ssehub.redis.streams import StreamReader

PACKAGE = Path(__file__).resolve().parent.parent / "ssehub"

# Calls that open a connection or build a client, whoever's they are.
OPENERS = {"from_url", "from_pool", "create_connection", "open_connection", "open_unix_connection"}
# redis-py's clients, pools and connections (as attributes: ``aioredis.Redis``; or imported).
BUILDERS = OPENERS | {
    "Redis",
    "StrictRedis",
    "RedisCluster",
    "ClusterNode",
    "Sentinel",
    "ConnectionPool",
    "BlockingConnectionPool",
    "SentinelConnectionPool",
    "Connection",
    "UnixDomainSocketConnection",
    "SSLConnection",
}
# The Redis layer's roles: built by its factory only, so every process model gets the
# topology's (workers once built a plain Broker whatever the config said).
ROLES = {
    "Broker",
    "SentinelBroker",
    "ClusterBroker",
    "StreamReader",
    "ClusterStreamReader",
    "StreamReplays",
    "EventsWriter",
    "PresenceReader",
    "Publisher",
    "ControlPlane",
}
# Modules whose import outside the Redis layer means a client is made there.
CLIENT_MODULES = ("hiredis", "redis.asyncio", "redis.client", "redis.cluster", "redis.sentinel")


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Name) and node.id in OPENERS:
            name = node.id
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.append(node.module)
                found.extend(  # (the config's own Sentinel is imported relatively)
                    f"{path}:{node.lineno}: imports {a.name}"
                    for a in node.names
                    if a.name in BUILDERS
                )
            found.extend(
                f"{path}:{node.lineno}: imports {m}"
                for m in modules
                if m == "redis" or any(m == c or m.startswith(c + ".") for c in CLIENT_MODULES)
            )
        if name in BUILDERS:
            found.append(f"{path}:{node.lineno}: uses {name}")
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if called in ROLES:
                found.append(f"{path}:{node.lineno}: builds {called} (not through the factory)")
    return found


def test_no_module_outside_the_redis_layer_builds_a_redis_client() -> None:
    outside = [p for p in PACKAGE.rglob("*.py") if (PACKAGE / "redis") not in p.parents]
    assert len(outside) > 20  # the walk found the package
    offences = [o for p in sorted(outside) for o in _offences(p)]
    assert offences == []


def test_the_check_finds_a_client_built_from_a_url(tmp_path: Path) -> None:
    """The check above can fail: each way of building a client is caught."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import redis.asyncio as aioredis\n"
        "from redis.asyncio.cluster import RedisCluster\n"
        "c = aioredis.Redis.from_url('redis://x')\n"
        "async def f(loop):\n"
        "    await loop.create_connection(None, 'h', 1)\n"
        "b = Broker(config.redis, [], print)\n"
    )
    found = "\n".join(_offences(sample))
    for what in ("imports redis.asyncio", "imports RedisCluster", "uses from_url", "uses Redis"):
        assert what in found
    assert "uses create_connection" in found
    assert "builds Broker" in found


def _redis(**redis: Any) -> Any:
    return parse({"channels": {"a": {}}, "redis": redis}, source="t").redis


TOPOLOGIES = {
    "plain": {"url": "redis://127.0.0.1:1/0"},
    "sentinel": {"sentinel": {"master": "m", "nodes": ["127.0.0.1:2"]}},
    "cluster": {"url": "redis+cluster://127.0.0.1:3,127.0.0.1:4"},
}


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_the_factory_builds_every_role_for_every_topology(topology: str) -> None:
    """Building a role opens nothing (the addresses here answer nothing)."""
    config = _redis(**TOPOLOGIES[topology])
    broker = factory.create_broker(config, [b"a"], lambda c, m: None)
    kind = {"plain": "Broker", "sentinel": SentinelBroker, "cluster": ClusterBroker}[topology]
    assert type(broker).__name__ == kind if isinstance(kind, str) else isinstance(broker, kind)
    reader = factory.create_stream_reader(config, print, print, lambda k: 0)
    assert type(reader) is (ClusterStreamReader if topology == "cluster" else StreamReader)
    replays = factory.create_replays(config)
    assert replays.config is config
    full = parse({"channels": {"a": {}}, "redis": TOPOLOGIES[topology]}, source="t")
    writer = factory.create_writer(full, "node1")
    assert writer.node == "node1"
    presence = factory.create_presence_reader(config)
    assert presence.config is config
    assert factory.create_publisher(config).config is config
    assert factory.create_control(full, Control(lambda: full)).config is full


def test_one_reconnect_state_machine_and_one_backoff_for_every_source() -> None:
    """Issue 19: the reconnect loop (state, backoff, reconnect count, 'up when every part
    is up') was written four times and had drifted. Every source is a Source now, and
    only source.py computes a backoff from reconnect_min/reconnect_max."""
    for kind in (Broker, SentinelBroker, ClusterBroker, StreamReader, ClusterStreamReader):
        assert issubclass(kind, Source), kind
        for name in ("_set_state", "_down", "reconnect_forever", "backoff"):
            assert name not in vars(kind) or kind is Source, (kind, name)
    redis_layer = PACKAGE / "redis"
    for path in sorted(redis_layer.glob("*.py")):
        if path.name == "source.py":
            continue
        tree = ast.parse(path.read_text())
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not used & {"reconnect_min", "reconnect_max", "uniform"}, path
