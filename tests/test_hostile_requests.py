"""Hostile or broken requests: a 4xx or a clean close, never a 5xx, a hang or a leak."""

from __future__ import annotations

import asyncio

from .conftest import StartHub
from .sseclient import http_request, wait_until


async def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


async def test_partial_request_is_closed_after_the_request_timeout(start_hub: StartHub) -> None:
    hub = await start_hub(limits={"request_timeout": 0.2})
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        writer.write(b"GET /channels/chat HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no answer
        assert loop.time() - started < 1.5
        # Meanwhile and afterwards the hub serves others.
        status, _, _ = await http_request(hub.port, "/healthz")
        assert status == 200
    finally:
        writer.close()


async def test_streams_are_not_swept_as_idle(start_hub: StartHub) -> None:
    hub = await start_hub(limits={"request_timeout": 0.1}, heartbeat=0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        writer.write(b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.6  # several sweep periods
        while loop.time() < end:
            chunk = await asyncio.wait_for(reader.read(4096), 2)
            assert chunk, "stream was closed"
            got += chunk
        assert got.startswith(b"HTTP/1.1 200")
        assert hub.hub.connections == 1
    finally:
        writer.close()


async def test_oversized_request_line_and_header_get_a_4xx(start_hub: StartHub) -> None:
    hub = await start_hub(limits={"max_line_size": 1024, "max_field_size": 1024})
    long_path = b"/channels/" + b"a" * 2000
    answer = await raw(hub.port, b"GET " + long_path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer[9:10] == b"4", answer[:60]
    answer = await raw(
        hub.port, b"GET /channels/chat HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n"
    )
    assert answer[9:10] == b"4", answer[:60]


async def test_garbage_gets_400(start_hub: StartHub) -> None:
    hub = await start_hub()
    answer = await raw(hub.port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")


async def test_connections_opened_and_dropped_in_a_loop_leak_nothing(start_hub: StartHub) -> None:
    hub = await start_hub()
    for _ in range(300):
        _, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        writer.write(b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        writer.transport.abort()
    await wait_until(lambda: hub.hub.connections == 0, timeout=5)
    status, _, _ = await http_request(hub.port, "/healthz")
    assert status == 200


async def test_invalid_utf8_in_a_channel_name_is_404_not_500(start_hub: StartHub) -> None:
    hub = await start_hub()
    for path in ["/channels/%80", "/channels/a%ff%fe", "/events?channel=%c3%28"]:
        answer = await raw(hub.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        assert answer.startswith(b"HTTP/1.1 404"), (path, answer[:80])
        assert b"unknown channel: " in answer


async def test_http2_request_line_is_400_not_500(start_hub: StartHub) -> None:
    hub = await start_hub()
    answer = await raw(hub.port, b"GET /channels/chat HTTP/2.0\r\nHost: x\r\n\r\n")
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:80]
