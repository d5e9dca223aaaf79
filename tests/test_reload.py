"""SIGHUP reload: added channels appear, removed ones close, the rest keep streaming."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ssehub.config import load
from ssehub.server import HubServer

from .logcheck import rendered
from .redis_server import RedisServer
from .sseclient import http_request, open_stream, wait_until


def write_config(path: Path, redis_url: str, channels: str, extra: str = "") -> None:
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: 0}}\nredis: {{url: '{redis_url}'}}\n"
        f"shutdown_timeout: 2\n{extra}channels:\n{channels}"
    )


@pytest.fixture
async def hub_from_file(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[HubServer, Path]]:
    path = tmp_path / "hub.yaml"
    write_config(path, redis_server.url, "  keep: {}\n  drop: {}\n")
    server = HubServer(load(path))
    await server.start()
    await wait_until(lambda: server.broker.ready)
    yield server, path
    await server.stop()


async def test_reload_adds_removes_and_keeps_channels(
    hub_from_file: tuple[HubServer, Path], redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    server, path = hub_from_file
    keep = await open_stream(server.port, "/channels/keep")
    drop = await open_stream(server.port, "/channels/drop")
    try:
        write_config(path, redis_server.url, "  keep: {history: 5}\n  added: {}\n")
        assert server.reload()
        await drop.read_to_eof()
        assert drop.ended_cleanly
        assert server.hub.stats.closed["channel_removed"] == 1
        status, _, _ = await http_request(server.port, "/channels/drop")
        assert status == 404
        added = await open_stream(server.port, "/channels/added")
        try:
            # The broker changed its subscription on the live connection.
            await wait_until(lambda: _numsub(redis_client, "added", 1), timeout=5)
            await wait_until(lambda: _numsub(redis_client, "drop", 0), timeout=5)
            assert await redis_client.pubsub_numsub("keep") == [(b"keep", 1)]
            await redis_client.publish("added", "new channel")
            await redis_client.publish("keep", "still here")
            assert [e.data for e in await added.next_events(1)] == ["new channel"]
            assert [e.data for e in await keep.next_events(1)] == ["still here"]
            assert server.broker.reconnects == 0
            assert server.hub.channels["keep"].history.size == 5
        finally:
            await added.close()
    finally:
        await keep.close()
        await drop.close()


async def _numsub(client: aioredis.Redis, channel: str, n: int) -> bool:
    return bool(await client.pubsub_numsub(channel) == [(channel.encode(), n)])


async def test_invalid_new_config_is_rejected_and_the_old_one_kept(
    hub_from_file: tuple[HubServer, Path], caplog: pytest.LogCaptureFixture
) -> None:
    server, path = hub_from_file
    keep = await open_stream(server.port, "/channels/keep")
    try:
        path.write_text("channels:\n  keep: {histroy: 5}\n")
        with caplog.at_level(logging.ERROR, logger="ssehub.server"):
            assert not server.reload()
        assert "reload rejected" in rendered(caplog)
        assert "channels.keep.histroy: unknown key" in rendered(caplog)
        assert set(server.hub.channels) == {"keep", "drop"}
        assert not keep.eof
    finally:
        await keep.close()


async def test_listen_and_redis_changes_wait_for_a_restart(
    hub_from_file: tuple[HubServer, Path], caplog: pytest.LogCaptureFixture
) -> None:
    server, path = hub_from_file
    old_redis = server.config.redis
    write_config(path, "redis://127.0.0.1:1/0", "  keep: {}\n  drop: {}\n")
    with caplog.at_level(logging.WARNING, logger="ssehub.server"):
        assert server.reload()
    assert "take effect on restart" in caplog.text
    assert server.config.redis == old_redis
    assert server.broker.ready


async def test_a_stream_catching_up_when_its_channel_is_removed_ends_instead_of_hanging(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """A client resuming a stream channel from Redis (further back than the cache) is
    between its channel's lookup and its registration while it reads: a reload that
    removes the channel then must end it, not register it in the removed channel, where
    it would get no event and no heartbeat ever again (issue 19)."""
    stream = "test:reload-catch-up"
    await redis_client.delete(stream)
    first = (await redis_client.xadd(stream, {"data": "first"})).decode()
    pipe = redis_client.pipeline(transaction=False)
    for i in range(2000):  # 8 MB: more than the kernel's socket buffers take
        pipe.xadd(stream, {"data": f"{i} " + "x" * 4000})
    await pipe.execute()
    path = tmp_path / "hub.yaml"
    extra = "heartbeat: 0.5\nlimits: {max_buffer_bytes: 65536}\n"
    write_config(
        path,
        redis_server.url,
        f"  keep: {{}}\n  orders: {{stream: '{stream}', history: 1}}\n",
        extra,
    )
    server = HubServer(load(path))
    await server.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await wait_until(lambda: server.ready, timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        request = f"GET /channels/orders HTTP/1.1\r\nHost: t\r\nLast-Event-ID: {first}\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        # Paging through Redis and waiting for the client, not yet registered.
        await wait_until(lambda: server.hub.stats.redis_replays["orders"] == 1, timeout=5)
        assert server.hub.connections == 0
        write_config(path, redis_server.url, "  keep: {}\n", extra)
        assert server.reload()
        got = bytearray()
        async with asyncio.timeout(10):  # three heartbeats and more: the stream must end
            while chunk := await loop.sock_recv(sock, 1 << 16):
                got += chunk
        assert got.endswith(b"\r\n0\r\n\r\n")  # ended cleanly: the browser comes back
        assert server.hub.stats.closed["channel_removed"] == 1
        assert server.hub.connections == 0
    finally:
        sock.close()
        await server.stop()
