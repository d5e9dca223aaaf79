"""The Redis side never dies from odd input: what passes --check works at run time,
the broker's loop survives whatever a connection attempt raises, and a reload whose
subscription update fails leaves the hub and the server on the same config."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis

from ssehub.config import ConfigError, RedisConfig, parse
from ssehub.redis.info import RedisVersionError
from ssehub.redis.pubsub import Broker

from .conftest import StartHub
from .logcheck import records_with
from .redis_server import RedisServer
from .sseclient import open_stream, wait_until
from .test_faults import data, gaps

BAD_URLS = {
    "redis://a..b/0": "invalid host",  # IDNA error inside getaddrinfo
    "redis://h:abc/0": "Port could not be cast",  # ValueError in redis-py's parse_url
    "redis://h:99999/0": "Port out of range",
    "redis://h/0?socket_timeout=abc": "socket_timeout",
    "unix://": "socket's path",  # no path: would have connected to 127.0.0.1:6379
    "redis://:secret@a..b/0": "invalid host",
}


@pytest.mark.parametrize(("url", "reason"), BAD_URLS.items())
def test_urls_that_cannot_work_are_config_errors(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"channels": {"a": {}}, "redis": {"url": url}}, source="hub.yaml")
    assert str(info.value).startswith("hub.yaml: redis.url: ")
    assert reason in str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("url", ["redis://a..b/0", "redis://h:abc/0"])
@pytest.mark.parametrize("check", [True, False])
def test_cli_exits_2_with_one_line_for_a_url_that_cannot_work(
    tmp_path: Path, url: str, check: bool
) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text(f"redis: {{url: '{url}'}}\nchannels: {{chat: {{}}}}\n")
    args = ["--check"] if check else ["--port", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "ssehub", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"ssehub: {config}: redis.url: ")


async def test_broker_survives_any_exception_from_a_connection_attempt(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ssehub.redis.pubsub")
    # Built directly, past the config's validation: what used to kill the broker's task.
    config = RedisConfig(url="redis://a..b/0", reconnect_min=0.01, reconnect_max=0.02)
    broker = Broker(config, ["chat"], lambda channel, payload: None)
    attempts = [0]
    connect = broker._connect

    async def counting() -> Any:
        attempts[0] += 1
        return await connect()

    broker._connect = counting  # type: ignore[method-assign]
    task = asyncio.create_task(broker.run())
    try:
        await wait_until(lambda: attempts[0] >= 3 or task.done(), timeout=5)
        assert not task.done(), task.exception()
        (line,) = records_with(caplog, "redis unavailable, retrying")
        assert line["reason"].startswith("UnicodeError: ")
        # And once attempts succeed again, it subscribes.
        good = RedisConfig(url=redis_server.url)
        broker._params = Broker(good, [], lambda c, p: None)._params
        await wait_until(lambda: broker.ready, timeout=5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_reload_while_the_redis_connection_is_going_keeps_hub_and_server_together(
    start_hub: StartHub, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    hub = await start_hub({"keep": {}})
    path = tmp_path / "hub.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: 0}}\nredis: {{url: '{hub.config.redis.url}'}}\n"
        "shutdown_timeout: 2\nchannels: {keep: {}, added: {}}\n"
    )
    hub.config = dataclasses.replace(hub.config, source=str(path))
    # The connection closes in the same step as the SIGHUP: the broker is still UP,
    # but its transport no longer takes writes.
    proto = hub.broker._proto
    assert proto is not None and proto.transport is not None
    proto.transport.close()
    assert hub.reload()
    assert set(hub.config.channels) == set(hub.hub.config.channels) == {"keep", "added"}
    # The next session subscribes to the new list.
    await wait_until(lambda: hub.broker.ready and hub.broker.reconnects == 1, timeout=10)
    client = await open_stream(hub.port, "/channels/added")
    try:
        await redis_client.publish("added", "after the reload")
        assert [e.data for e in await client.next_events(1)] == ["after the reload"]
    finally:
        await client.close()


async def ends_by_itself(
    run: Coroutine[Any, Any, None], kind: type[BaseException], match: str, timeout: float
) -> None:
    """``run`` ends within ``timeout`` by itself (not when cancelled), raising ``kind``."""
    task = asyncio.create_task(run)
    try:
        await wait_until(task.done, timeout)
        with pytest.raises(kind, match=match):
            task.result()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _run_broker(broker: Broker) -> asyncio.Task[None]:
    task = asyncio.create_task(broker.run())
    await wait_until(lambda: broker.ready or task.done(), timeout=10)
    assert not task.done(), task.exception()
    return task


@pytest.mark.parametrize("flushed_first", [False, True])
async def test_a_channel_wanted_again_in_the_batch_that_drops_it_is_subscribed(
    redis_server: RedisServer, redis_client: aioredis.Redis, flushed_first: bool
) -> None:
    """Issue 19, defect 2: the grace sweep drops a member and a browser asks for it
    again before the UNSUBSCRIBE went out; the stream must not wait forever."""
    got: list[bytes] = []
    config = RedisConfig(url=redis_server.url)
    broker = Broker(config, ["keep"], lambda channel, payload: got.append(payload))
    task = await _run_broker(broker)
    try:
        broker.want([b"member"])
        assert await broker.wait_subscribed([b"member"], 5)
        if flushed_first:
            # A change just went out: the drop waits the batch window (10 ms) for
            # others, and the want lands within it, as in a reconnect storm.
            broker.want([b"other"])
            await asyncio.sleep(0)
        broker.drop([b"member"])
        await asyncio.sleep(0)
        broker.want([b"member"])
        assert await broker.wait_subscribed([b"member"], 2)
        await redis_client.publish("member", "still here")
        await wait_until(lambda: b"still here" in got, timeout=5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class OldRedis:
    """Speaks just enough RESP to pass for a Redis of ``version`` (INFO, PING, AUTH)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        parser = hiredis.Reader()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    name = command[0].upper()
                    if name == b"INFO":
                        text = f"# Server\r\nredis_version:{self.version}\r\nrun_id:x\r\n".encode()
                        writer.write(b"$%d\r\n%s\r\n" % (len(text), text))
                    elif name == b"PING":
                        writer.write(b"+PONG\r\n")
                    else:
                        writer.write(b"-ERR unknown command\r\n")

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.mark.parametrize(("version", "cluster"), [("6.0.16", False), ("6.2.14", True)])
async def test_a_redis_older_than_ssehub_needs_is_refused_with_a_clear_message(
    caplog: pytest.LogCaptureFixture, version: str, cluster: bool
) -> None:
    """6.2 at least (XRANGE's exclusive ranges, SET ... GET); 7.0 for Cluster's sharded
    pub/sub. The broker's run() ends with the error (its owner stops the process)
    instead of retrying forever or failing later in ways far harder to read."""
    caplog.set_level(logging.ERROR, logger="ssehub.redis.pubsub")
    old = OldRedis(version)
    await old.start()
    try:
        config = RedisConfig(url=f"redis://127.0.0.1:{old.port}/0", reconnect_min=0.01)
        broker = Broker(config, ["chat"], lambda channel, payload: None)
        if cluster:
            broker.subscribe_command = "SSUBSCRIBE"  # as a cluster node's broker
        await ends_by_itself(
            broker.run(), RedisVersionError, f"version {version}; ssehub needs Redis", 5
        )
        (line,) = records_with(caplog, "redis too old")
        assert "6.2, or 7.0 with Redis Cluster" in line["reason"]
    finally:
        await old.stop()


async def test_redis_closing_the_subscription_for_a_big_message_is_explained(
    caplog: pytest.LogCaptureFixture, start_hub: StartHub
) -> None:
    """A publisher's message past Redis's client-output-buffer-limit for pub/sub makes
    Redis close the hub's subscription (a gap for every pub/sub channel), before the
    hub's limits.max_message_bytes can act: the hub says so, then resubscribes."""
    caplog.set_level(logging.INFO, logger="ssehub.redis.pubsub")
    redis = RedisServer("--client-output-buffer-limit", "pubsub 1mb 256kb 60")
    redis.start()
    publisher = aioredis.Redis.from_url(redis.url)
    try:
        hub = await start_hub(
            {"chat": {}}, redis_url=redis.url, redis={"url": redis.url, "reconnect_min": 0.01}
        )
        client = await open_stream(hub.port, "/channels/chat")
        try:
            await publisher.publish("chat", b"x" * (2 << 20))
            await wait_until(lambda: hub.broker.reconnects == 1 and hub.broker.ready, 10)
            (closed,) = records_with(caplog, "redis had closed the subscription connection")
            assert "client-output-buffer-limit pubsub" in closed["cause"]
            down = records_with(caplog, "redis down")
            assert [d["reason"] for d in down] == ["connection closed by redis"]
            await client.read_until(lambda c: bool(gaps(c)))
            await publisher.publish("chat", "small")
            await client.read_until(lambda c: "small" in data(c))
        finally:
            await client.close()
    finally:
        await publisher.aclose()
        redis.stop()
