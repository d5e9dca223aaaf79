"""The three Redis topologies a hub runs on, behind one interface for the test matrix.

One Redis, a master watched by sentinels, and a 3-master cluster: each knows the hub's
``redis:`` section for it, how a publisher publishes (``SPUBLISH`` on the owning
master in a cluster), how to append to a stream, where ``PUBLISH``ed messages can be
heard, and how to fail its master (and heal afterwards, so that the topology can fail
again). Synchronous, like redis_topology.py: async tests call it through
``asyncio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import redis

from .redis_server import RedisServer, free_port
from .redis_topology import RedisCluster, SentinelSetup, poll

__all__ = ["ClusterTopology", "OneRedis", "SentinelTopology", "Topology"]

# The hub's reconnect backoff in the matrix: a failover is followed within a few
# hundred ms of Redis answering again.
QUICK = {"reconnect_min": 0.02, "reconnect_max": 0.2}


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=2)


class Topology(Protocol):
    name: str

    def redis_config(self) -> dict[str, Any]:
        """The hub's ``redis:`` section."""

    def publish(self, channel: str, messages: Sequence[str]) -> None:
        """Publish ``messages`` in order on ``channel``, as an application would."""

    def xadd(self, key: str, data: Sequence[str], replicated: bool = False) -> list[str]:
        """Append one entry per item to stream ``key``; their ids. ``replicated``: on a
        replica too before this returns (``WAIT``), so a failover keeps them."""

    def listen_port(self) -> int:
        """A node on which classic ``PUBLISH``ed messages (the hub's events) can be heard."""

    def fail_master(self, key: str) -> None:
        """Kill the master holding ``key`` (SIGKILL); return once a master serves it again."""


class OneRedis:
    """One redis-server that keeps its data across a restart (AOF, fsync on every write):
    its "failover" is a crash and a restart on the same port."""

    name = "one"

    def __init__(self) -> None:
        self.server = RedisServer("--appendonly", "yes", "--appendfsync", "always")

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def redis_config(self) -> dict[str, Any]:
        return {"url": self.server.url, **QUICK}

    def publish(self, channel: str, messages: Sequence[str]) -> None:
        _publish(self.server.port, "PUBLISH", channel, messages)

    def xadd(self, key: str, data: Sequence[str], replicated: bool = False) -> list[str]:
        return _xadd(self.server.port, key, data, replicas=0)

    def listen_port(self) -> int:
        return self.server.port

    def fail_master(self, key: str) -> None:
        self.server.kill()
        self.server.start()


class SentinelTopology:
    """A master, its replica and three sentinels; a failover promotes the replica and
    the killed master comes back as its replica (the sentinels reconfigure it)."""

    name = "sentinel"

    def __init__(self) -> None:
        self.setup = SentinelSetup()
        # With Sentinel the URL's host and port are not where the master is (the
        # sentinels say where): nothing listens there, so a part of the hub that
        # ignores the sentinels cannot work by accident (and never touches 6379).
        self.decoy = f"redis://127.0.0.1:{free_port()}/0"
        self.killed: RedisServer | None = None

    def start(self) -> None:
        self.setup.start()

    def stop(self) -> None:
        self.setup.stop()

    def redis_config(self) -> dict[str, Any]:
        sentinel = {"master": self.setup.name, "nodes": self.setup.nodes}
        return {"url": self.decoy, "sentinel": sentinel, **QUICK}

    def publish(self, channel: str, messages: Sequence[str]) -> None:
        _publish(self.setup.master_port(), "PUBLISH", channel, messages)

    def xadd(self, key: str, data: Sequence[str], replicated: bool = False) -> list[str]:
        return _xadd(self.setup.master_port(), key, data, replicas=1 if replicated else 0)

    def listen_port(self) -> int:
        return self.setup.master_port()

    def fail_master(self, key: str) -> None:
        self.heal()
        old = self.setup.master_port()
        victim = next(s for s in (self.setup.master, self.setup.replica) if s.port == old)
        victim.kill()
        self.killed = victim
        self.setup.wait_promoted(old, 30)

    def heal(self) -> None:
        """Bring a killed master back; the sentinels turn it into the new master's replica."""
        if self.killed is None:
            return
        self.killed.start()
        port = self.killed.port
        self.killed = None

        def replica_in_sync() -> bool:
            with _client(port) as r:
                info = r.info("replication")
            return info["role"] == "slave" and info.get("master_link_status") == "up"

        poll(replica_in_sync, 30, "the old master to rejoin as a replica")


class ClusterTopology:
    """Three masters with a replica each; a failover kills the master owning a key and the
    cluster promotes its replica; healing restarts the killed node, which rejoins as a
    replica (its nodes.conf is kept)."""

    name = "cluster"

    def __init__(self) -> None:
        self.cluster = RedisCluster()
        self.killed: RedisServer | None = None

    def start(self) -> None:
        self.cluster.start()

    def stop(self) -> None:
        self.cluster.stop()

    def redis_config(self) -> dict[str, Any]:
        return {"url": self.cluster.seeds, **QUICK}

    def publish(self, channel: str, messages: Sequence[str]) -> None:
        # Channels are sharded (the default with a cluster): SPUBLISH on the owner.
        _publish(self.cluster.owner(channel), "SPUBLISH", channel, messages)

    def xadd(self, key: str, data: Sequence[str], replicated: bool = False) -> list[str]:
        return _xadd(self.cluster.owner(key), key, data, replicas=1 if replicated else 0)

    def listen_port(self) -> int:
        return self.cluster.live[0]

    def fail_master(self, key: str) -> None:
        self.heal()
        victim = self.cluster.owner(key)
        node = next(n for n in self.cluster.nodes if n.port == victim)
        node.kill()
        self.killed = node
        self.cluster.wait_stable(30)

    def heal(self) -> None:
        if self.killed is None:
            return
        self.killed.start()
        self.killed = None
        self.cluster.wait_stable(30)


def _publish(port: int, command: str, channel: str, messages: Sequence[str]) -> None:
    with _client(port) as r:
        pipe = r.pipeline(transaction=False)
        for m in messages:
            pipe.execute_command(command, channel, m)
        pipe.execute()


def _xadd(port: int, key: str, data: Sequence[str], replicas: int) -> list[str]:
    with _client(port) as r:
        pipe = r.pipeline(transaction=False)
        for d in data:
            pipe.xadd(key, {"data": d})
        ids = [i.decode() for i in pipe.execute()]
        if replicas:
            assert r.wait(replicas, 5000) >= replicas
        return ids
