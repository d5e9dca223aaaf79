"""Real Redis topologies on free loopback ports: a cluster, and a master watched by sentinels.

Everything here is synchronous (subprocesses and redis-py's blocking client): async
tests call the waits through ``asyncio.to_thread``. Every wait polls with a deadline.
``stop()`` stops every process started, also after a failed start.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from .redis_server import RedisServer, free_port

__all__ = ["RedisCluster", "SentinelSetup", "poll"]


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call ``check`` until it returns something true (and return it), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (redis.RedisError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)


def _command(port: int, *args: Any) -> Any:
    with _client(port) as c:
        return c.execute_command(*args)  # type: ignore[no-untyped-call]


# Replicas sync at once (Redis 7 waits 5 s for more replicas to share a diskless sync):
# a replica that has not synced yet cannot be promoted.
QUICK_SYNC = ("--repl-diskless-sync-delay", "0")


def bus_port() -> tuple[str, str]:
    """A free port of its own for a node's cluster bus: the default, port + 10000, may
    be taken or, for ports above 55535, not exist."""
    return ("--cluster-port", str(free_port()))


def _synced(port: int) -> bool:
    """True for a master, or a replica whose link to its master is up."""
    info = _command(port, "INFO", "replication")
    return info["role"] == "master" or info.get("master_link_status") == "up"


class RedisCluster:
    """Three masters with a replica each (``redis-cli --cluster create``), node timeout 1 s."""

    def __init__(self, masters: int = 3) -> None:
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        timeout = ("--cluster-node-timeout", "1000")  # failover within a few seconds
        self.nodes = [
            RedisServer(*args, *bus_port(), *timeout, *QUICK_SYNC) for _ in range(masters * 2)
        ]

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed (./dev installs redis-tools)")
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addrs, "--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=30,
            )
            self.wait_stable(20)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @property
    def live(self) -> list[int]:
        return [n.port for n in self.nodes if n.proc is not None]

    @property
    def seeds(self) -> str:
        """A ``redis+cluster://`` URL naming every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def slots(self, port: int | None = None) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port) as one node sees them."""
        reply = _command(port or self.live[0], "CLUSTER", "SLOTS")
        return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in reply)

    def masters(self) -> set[int]:
        return {port for _, _, port in self.slots()}

    def owner(self, channel: str) -> int:
        """The port of the master that owns ``channel``'s slot (Redis computes the slot)."""
        slot = int(_command(self.live[0], "CLUSTER", "KEYSLOT", channel))
        return next(port for first, last, port in self.slots() if first <= slot <= last)

    def channels_on_each_master(self, prefix: str, per_master: int = 1) -> list[str]:
        """Names ``<prefix><n>`` covering every master ``per_master`` times."""
        wanted = {port: per_master for port in self.masters()}
        names = []
        n = 0
        while any(wanted.values()):
            name = f"{prefix}{n}"
            n += 1
            port = self.owner(name)
            if wanted[port]:
                wanted[port] -= 1
                names.append(name)
        return names

    def spublish(self, channel: str, message: str) -> int:
        """SPUBLISH on the owner; the number of subscribers that received it."""
        return int(_command(self.owner(channel), "SPUBLISH", channel, message))

    def publish(self, channel: str, message: str) -> int:
        """Classic PUBLISH on any node (the cluster bus carries it to every node)."""
        return int(_command(self.live[-1], "PUBLISH", channel, message))

    def shard_channels(self, port: int) -> set[str]:
        return {c.decode() for c in _command(port, "PUBSUB", "SHARDCHANNELS")}

    def kill(self, port: int) -> None:
        next(n for n in self.nodes if n.port == port).kill()

    def wait_stable(self, timeout: float) -> None:
        """Until every live node says ``cluster_state:ok`` with the same full slot map."""

        def stable() -> bool:
            maps = set()
            for port in self.live:
                info = _command(port, "CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return False
                maps.add(tuple(self.slots(port)))
            if len(maps) != 1:
                return False  # the nodes do not agree yet (a failover spreading)
            (slots,) = maps
            return (
                sum(last + 1 - first for first, last, _ in slots) == 16384
                and all(port in self.live for _, _, port in slots)
                and all(_synced(port) for port in self.live)
            )

        poll(stable, timeout, "a stable cluster")

    def failover(self, master: int) -> None:
        """``CLUSTER FAILOVER`` on ``master``'s replica; returns once the cluster agrees."""
        _command(self.replica_of(master), "CLUSTER", "FAILOVER")
        poll(lambda: master not in self.masters(), 20, f"{master} to be demoted")
        self.wait_stable(20)

    def replica_of(self, master: int) -> int:
        for port in self.live:
            role = _command(port, "ROLE")
            if role[0] == b"slave" and int(role[2]) == master:
                return port
        raise LookupError(master)


SENTINEL_CONF = """\
sentinel monitor {name} 127.0.0.1 {port} 2
sentinel down-after-milliseconds {name} 1000
sentinel failover-timeout {name} 5000
"""


class SentinelSetup:
    """A master, a replica and three sentinels (``redis-server --sentinel``), quorum 2."""

    name = "hubmaster"

    def __init__(self) -> None:
        self.master = RedisServer(*QUICK_SYNC)
        self.replica = RedisServer(*QUICK_SYNC)
        self.sentinels = [RedisServer("--sentinel", conf="sentinel.conf") for _ in range(3)]

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica, *self.sentinels]

    def start(self) -> None:
        try:
            self.master.start()
            self.replica.args += ("--replicaof", "127.0.0.1", str(self.master.port))
            self.replica.start()
            poll(lambda: _synced(self.replica.port), 10, "the replica's first sync")
            conf = SENTINEL_CONF.format(name=self.name, port=self.master.port)
            for s in self.sentinels:
                Path(s.dir, "sentinel.conf").write_text(conf)
                s.start()

            def watched() -> bool:
                for s in self.sentinels:
                    # redis-py turns the reply into a dict
                    state = _command(s.port, "SENTINEL", "MASTER", self.name)
                    if state[b"num-slaves"] != b"1" or state[b"num-other-sentinels"] != b"2":
                        return False
                return True

            poll(watched, 20, "sentinels that know the replica and each other")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def master_port(self) -> int:
        """The master's port as the first live sentinel tells it."""
        for s in self.sentinels:
            if s.proc is not None:
                return int(_command(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)[1])
        raise LookupError("no sentinel runs")

    def wait_promoted(self, old: int, timeout: float) -> int:
        """Until every sentinel names a new master that says it is one; its port."""

        def promoted() -> int | None:
            ports = {
                int(_command(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)[1])
                for s in self.sentinels
            }
            if len(ports) != 1 or old in ports:
                return None
            (port,) = ports
            return port if _command(port, "ROLE")[0] == b"master" else None

        port: int = poll(promoted, timeout, "the replica's promotion")
        return port

    def publish(self, channel: str, message: str) -> int:
        return int(_command(self.master_port(), "PUBLISH", channel, message))

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote the replica, the old master stays up as a replica."""
        _command(self.sentinels[0].port, "SENTINEL", "FAILOVER", self.name)
