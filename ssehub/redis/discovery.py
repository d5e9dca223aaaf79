"""Finding Redis nodes: one-shot commands to cluster nodes, node URLs, RESP encoding.

Cluster sources ask a node where things are (``CLUSTER SLOTS``) before they subscribe
or read. Those questions are rare (start-up and faults), so each is its own short
connection: connect, authenticate, one command, one reply, close. The subscription
connections stay the sources' own. (Sentinels are asked through redis-py's Sentinel
client: clients.sentinels.)
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from ..config import RedisConfig

__all__ = ["Address", "QueryError", "command", "node_url", "query", "show"]

Address = tuple[str, int]


def command(*args: str | bytes) -> bytes:
    """One command in RESP, as Redis reads it."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        b = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


class QueryError(Exception):
    """The node could not be asked, or answered with an error."""


def show(addr: Address) -> str:
    """``host:port`` (``[v6]:port``) for logs and URLs."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tls(config: RedisConfig) -> bool:
    return config.url.startswith("rediss://")


def node_url(config: RedisConfig, addr: Address) -> str:
    """A ``redis://`` URL for one node, with the credentials and TLS of ``redis.url``."""
    netloc = urlsplit(config.url.replace("+cluster://", "://", 1)).netloc
    userinfo, at, _ = netloc.rpartition("@")
    scheme = "rediss" if _tls(config) else "redis"
    return f"{scheme}://{userinfo}{at}{show(addr)}"


async def query(config: RedisConfig, addr: Address, *args: str | bytes) -> Any:
    """Send one command to ``addr`` and return its reply (within ``connect_timeout``)."""
    try:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that lands
        # as the query completes (a refused connection does at once), and the owner's
        # stop would wait for a loop that never ends.
        async with asyncio.timeout(config.connect_timeout):
            return await _query(config, addr, args)
    except (OSError, ssl.SSLError, EOFError) as exc:  # TimeoutError is an OSError
        raise QueryError(f"{show(addr)}: {str(exc) or type(exc).__name__}") from None


async def _query(config: RedisConfig, addr: Address, args: tuple[str | bytes, ...]) -> Any:
    tls = ssl.create_default_context() if _tls(config) else None
    reader, writer = await asyncio.open_connection(*addr, ssl=tls)
    try:
        parser = hiredis.Reader()
        commands = [args]
        parts = urlsplit(config.url.replace("+cluster://", "://", 1))
        if parts.password:
            user = unquote(parts.username) if parts.username else None
            password = unquote(parts.password)
            commands.insert(0, ("AUTH", user, password) if user else ("AUTH", password))
        writer.write(b"".join(command(*c) for c in commands))
        replies: list[Any] = []
        while len(replies) < len(commands):
            data = await reader.read(65536)
            if not data:
                raise EOFError("connection closed")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                replies.append(reply)
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise QueryError(f"{show(addr)}: {reply}")
        return replies[-1]
    finally:
        writer.close()
