"""What a Redis server says about itself (``INFO``): whether it is recent enough, and why
it may have closed the subscription connection.

**Minimum version: Redis 6.2** (7.0 with Redis Cluster). ssehub uses, beyond
pub/sub: exclusive ranges in ``XRANGE`` (``(id``, resuming stream channels) and
``SET ... GET`` (the presence liveness key), both new in 6.2; Streams, ``CLIENT ID``
and ``CLIENT UNBLOCK`` (5.0); ACL users in ``AUTH`` (6.0); ``EVAL`` (events). Redis
Cluster's sharded pub/sub (``SSUBSCRIBE``) is 7.0's. Every subscription connection
checks the server's ``redis_version`` when it connects, and a server too old is
refused: logged once, clearly, and fatal to the process (retrying cannot help), where
an older server would fail later in ways far harder to read.
"""

from __future__ import annotations

__all__ = [
    "MIN_SHARDED_VERSION",
    "MIN_VERSION",
    "CloseDiagnosis",
    "RedisVersionError",
    "check_version",
    "parse_info",
]

MIN_VERSION = (6, 2)
MIN_SHARDED_VERSION = (7, 0)

# INFO stats' count of clients Redis closed for their output buffer (7.2 and later).
_OUTPUT_LIMIT = "client_output_buffer_limit_disconnections"


class RedisVersionError(Exception):
    """The Redis reached is older than ssehub needs: refused, never retried."""


def parse_info(reply: bytes) -> dict[str, str]:
    """``INFO``'s ``key:value`` lines as a dict (sections and comments dropped)."""
    out = {}
    for line in reply.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            out[key] = value.strip()
    return out


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_version(info: dict[str, str], need: tuple[int, int], where: str) -> None:
    """Raise ``RedisVersionError`` when ``info`` names a version older than ``need``."""
    version = info.get("redis_version", "")
    if _version(version) < need:
        wanted = ".".join(map(str, need))
        raise RedisVersionError(
            f"redis at {where} is version {version or 'unknown'}; ssehub needs Redis "
            f"{wanted} or later (6.2, or 7.0 with Redis Cluster: see README, Redis versions)"
        )


class CloseDiagnosis:
    """Why Redis closed a subscription connection, told at the next connect.

    Redis closes a subscriber whose unsent output passes ``client-output-buffer-limit
    pubsub`` (32 MB at once, or 8 MB for 60 s, by default): one message larger than
    that (publishers are not bounded by the hub's ``limits.max_message_bytes``), or a
    hub reading too slowly. Everything published until the hub resubscribes is lost
    for it. Redis says nothing on the connection; from 7.2 its INFO counts such
    disconnections, and a restart shows as a new ``run_id``.
    """

    def __init__(self) -> None:
        self.run_id = ""
        self.output_limit: int | None = None

    def seen(self, info: dict[str, str]) -> None:
        """Remember what the server said at this connect."""
        self.run_id = info.get("run_id", "")
        count = info.get(_OUTPUT_LIMIT)
        self.output_limit = int(count) if count is not None and count.isdigit() else None

    def cause(self, info: dict[str, str]) -> str:
        """The likely cause of the last close, from what the server says now."""
        if self.run_id and info.get("run_id") not in ("", self.run_id):
            return "redis restarted"
        count = info.get(_OUTPUT_LIMIT)
        if self.output_limit is not None and count is not None and count.isdigit():
            if int(count) > self.output_limit:
                return (
                    "redis closed it for its client-output-buffer-limit pubsub (a message "
                    "larger than the limit, or the hub reading too slowly)"
                )
            return "redis closed it (CLIENT KILL, or its timeout setting)"
        return (
            "redis closed it; likely its client-output-buffer-limit pubsub (by default "
            "32mb at once or 8mb for 60s: a message larger than that, or the hub reading "
            "too slowly), or CLIENT KILL"
        )
