"""Command clients (redis-py) for one Redis, Redis Sentinel and Redis Cluster.

The subscription connection is the hub's own protocol (pubsub.py); every other role
(the stream reader's connections, replay reads, the events/presence writer, the
presence reader) speaks ordinary commands through redis-py, and this module is the one
place such a client is built from the ``redis`` config. redis-py does the topology's
work: with Sentinel its ``SentinelConnectionPool`` asks the sentinels for the master at
each new connection (so a failover is followed by the next connection); with Cluster
its ``RedisCluster`` keeps the slot map and follows ``MOVED``/``ASK``.

Retries are never redis-py's: every caller has its own policy (a reconnect with
backoff, a read that fails alone), so clients are built with ``Retry(NoBackoff(), 0)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import RedisClusterException, RedisError

from ..config import RedisConfig
from .discovery import node_url

__all__ = [
    "FAULTS",
    "Client",
    "close",
    "close_sentinels",
    "command_client",
    "master_moved",
    "sentinels",
]

# What a role gets: one client whatever the topology. Both speak the commands used here
# (XRANGE, PUBLISH, HSET, pipelines); RedisCluster routes each by its key.
Client = aioredis.Redis | RedisCluster

# What a command can fail with: redis-py's errors, the socket's, and (redis-py's
# cluster client) RedisClusterException, which is no RedisError.
FAULTS = (RedisError, OSError, RedisClusterException)


def _params(url: str) -> dict[str, Any]:
    """Credentials, db and TLS of ``url``, as redis-py connection arguments."""
    params: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    out: dict[str, Any] = {k: params[k] for k in ("username", "password", "db") if k in params}
    if url.startswith("rediss://"):
        out["ssl"] = True
    return out


def command_client(
    config: RedisConfig,
    *,
    socket_timeout: float | None,
    max_connections: int | None = None,
    single: bool = False,
) -> Client:
    """A client for ``config``'s Redis, opening connections as commands need them.

    ``single``: one connection, kept (what a blocking ``XREAD`` and its ``CLIENT ID``
    need); not for Cluster, whose commands go to many nodes. ``max_connections``
    bounds the pool (per node with Cluster); callers bound their own concurrency to it.
    """
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": config.connect_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.cluster:
        if single:
            raise ValueError("a single-connection client is for one node, not a cluster")
        params = _params(node_url(config, config.seeds()[0]))
        params.pop("db", None)  # a cluster has only db 0
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in config.seeds()],
            max_connections=max_connections or 100,
            **options,
            **params,
        )
    if max_connections is not None:
        options["max_connections"] = max_connections
    sentinel = config.sentinel
    if sentinel is None:
        client: aioredis.Redis = aioredis.Redis.from_url(
            config.url, single_connection_client=single, **options
        )
        return client
    # The master as the sentinels name it at each new connection. The credentials and
    # db of redis.url are the master's; the sentinels are asked without them.
    options.update(_params(config.url))
    pool = SentinelConnectionPool(sentinel.master, sentinels(config), **options)  # type: ignore[no-untyped-call]
    client = aioredis.Redis(connection_pool=pool, single_connection_client=single)
    client.auto_close_connection_pool = True  # aclose() closes the pool it owns
    return client


async def master_moved(client: Client) -> bool:
    """With Sentinel: whether the sentinels name another master than ``client``'s
    connections were opened to (its idle connections are then dropped, so the next
    command reaches the new master). A demoted master that lives on as a replica still
    answers reads, with what it had: a reader that must not read stale data asks this
    when an answer looks short. False without Sentinel, or when the sentinels cannot
    be asked."""
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return False
    before = pool.master_address
    try:
        now = await pool.get_master_address()  # type: ignore[no-untyped-call]
    except FAULTS:
        return False
    return before is not None and now != before


def sentinels(config: RedisConfig) -> Sentinel:
    """redis-py's Sentinel client for ``config``'s sentinels: ``discover_master`` asks
    them in order (``SENTINEL MASTERS``), skips one that sees the master down, and asks
    the one that answered first next time. No password (as ``redis.url``'s is the
    master's); TLS as ``redis.url`` says."""
    assert config.sentinel is not None
    options: dict[str, Any] = {
        "socket_timeout": config.connect_timeout,
        "socket_connect_timeout": config.connect_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.url.startswith("rediss://"):
        options["ssl"] = True
    return Sentinel(config.sentinel.addresses(), sentinel_kwargs=options)  # type: ignore[no-untyped-call]


async def close_sentinels(finder: Sentinel) -> None:
    """Close the connections of ``finder`` to the sentinels."""
    await close(*finder.sentinels)


async def close(*clients: Client) -> None:
    """Close ``clients`` (and, with Sentinel, their connections to the sentinels) for
    sure: a cancel (the hub stopping) waits for the closing to finish, so no socket
    outlives its owner."""
    closers = []
    for client in clients:
        closers.append(client.aclose())
        pool = getattr(client, "connection_pool", None)
        if isinstance(pool, SentinelConnectionPool):
            closers.extend(s.aclose() for s in pool.sentinel_manager.sentinels)
    closing = asyncio.gather(*closers, return_exceptions=True)
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        await closing
        raise
