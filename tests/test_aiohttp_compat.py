"""Each assumption in ssehub/http/compat.py, checked against the installed aiohttp.

These fail loudly when an aiohttp upgrade changes what the hub relies on, rather than
the hub silently losing a protection. They run a minimal aiohttp app on a real socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError

from ssehub.core import sse
from ssehub.http.compat import (
    HeadWithBody,
    close_connection_after,
    connections,
    expect,
    headers_before_routing,
    read_no_more,
    request_in_progress,
    stream_transport,
)
from ssehub.http.headers import RESPONSE_HEADERS

from .conftest import StartHub
from .sseclient import SSEClient, http_request, wait_until

Serve = Callable[[web.Application], Awaitable[tuple[web.AppRunner, int]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert runner.addresses
        return runner, runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_request_in_progress_follows_a_request_on_its_handler(serve: Serve) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/", held)
    runner, port = await serve(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await wait_until(lambda: len(connections(runner)) == 1)
        (handler,) = connections(runner)
        assert not request_in_progress(handler)  # connected, nothing sent
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        assert not request_in_progress(handler)  # a partial head is not a request
        writer.write(b"1\r\n\r\n")
        await wait_until(lambda: request_in_progress(handler))
        release.set()
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        # Kept alive and idle again: the sweep must see it as idle.
        await wait_until(lambda: not request_in_progress(handler))
        assert connections(runner) == [handler]
    finally:
        writer.close()


async def test_prepare_hooks_run_before_a_streams_headers_are_sent(serve: Serve) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"x")
        await asyncio.Event().wait()  # a stream: the handler never returns
        return resp

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Hook"] = "ran"
        close_connection_after(response)

    app = web.Application()
    app.router.add_get("/", stream)
    app.on_response_prepare.append(hook)
    _, port = await serve(app)
    client = await SSEClient.connect(port, "/")
    try:
        assert client.headers["x-hook"] == "ran"
        assert client.headers["connection"] == "close"
    finally:
        await client.close()


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_direct_transport_writes_follow_the_writer_in_order(
    serve: Serve, version: str
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        chunked = request.version == HttpVersion11
        if chunked:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first\n")
        transport = stream_transport(request)
        assert transport is not None
        for part in (b"second\n", b"third\n"):
            transport.write(sse.chunk(part) if chunked else part)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", stream)
    _, port = await serve(app)
    client = await SSEClient.connect(port, "/", version=version)
    try:
        await client.read_until(lambda c: c.ended_cleanly or c.eof)
        assert client.body == b"first\nsecond\nthird\n"
        if version == "1.1":
            assert client.headers["transfer-encoding"] == "chunked"
            assert client.ended_cleanly  # write_eof's last chunk came after the direct ones
    finally:
        await client.close()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_head_with_body_sends_the_head_with_the_first_bytes_then_forgets_it(
    serve: Serve, method: str
) -> None:
    sent: list[int] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = HeadWithBody(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent.append(request.writer.output_size)  # nothing yet: the head waits
        if method == "GET":
            await resp.write(b"first\n")
            sent.append(request.writer.output_size)
            resp.forget_head()  # what follows needs no header
            assert not resp.headers
            await resp.write(b"second\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", stream)
    _, port = await serve(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} / HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while not data.endswith(b"0\r\n\r\n") and not (method == "HEAD" and b"\r\n\r\n" in data):
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            assert chunk, data
            data += chunk
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert sent[0] == 0
    if method == "GET":
        assert body == b"6\r\nfirst\n\r\n7\r\nsecond\n\r\n0\r\n\r\n"
        # One write: the head, the chunk's size line, the bytes and their CRLF.
        assert sent[1] == len(head) + 4 + len(b"6\r\nfirst\n\r\n")
    else:
        assert body == b""


async def test_read_no_more_ignores_what_a_stream_client_sends_and_still_sees_it_leave(
    serve: Serve,
) -> None:
    go_on = asyncio.Event()
    cancelled = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first\n")
        read_no_more(request)
        assert request.protocol._parser is None
        await go_on.wait()
        await resp.write(b"second\n")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return resp

    app = web.Application()
    app.router.add_get("/", stream)
    _, port = await serve(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"first" not in data:
            data += await asyncio.wait_for(reader.read(4096), 5)
        # A pipelined request and bytes no parser would take: neither is answered.
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff garbage\r\n\r\n")
        await writer.drain()
        go_on.set()
        while b"second" not in data:
            data += await asyncio.wait_for(reader.read(4096), 5)
        assert data.count(b"HTTP/1.1") == 1 and b"400" not in data
    finally:
        writer.close()
    await asyncio.wait_for(cancelled.wait(), 5)  # the client leaving still ends it


async def test_route_expect_handler_replaces_aiohttps_own(serve: Serve) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok, expect_handler=expect)
    _, port = await serve(app)
    status, _, _ = await http_request(port, "/", headers={"Expect": "100-continue"})
    assert status == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: \xff\xfe-odd\r\n\r\n")
        head = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 417"), head


async def test_aiohttp_logs_unparsable_requests_as_http_processing_errors(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    # What aiohttp itself logs: without the filter a HubServer built earlier in this
    # process left on its logger (logging is process-wide).
    server_log = logging.getLogger("aiohttp.server")
    filters = list(server_log.filters)
    for f in filters:
        server_log.removeFilter(f)
    try:
        await _logs_unparsable_request(serve, caplog)
    finally:
        for f in filters:
            server_log.addFilter(f)


async def _logs_unparsable_request(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    app = web.Application()
    _, port = await serve(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).split()[1] == b"400"
    finally:
        writer.close()

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "aiohttp.server" and r.exc_info]

    await wait_until(logged)
    exc = logged()[0].exc_info
    assert exc is not None and isinstance(exc[1], HttpProcessingError)


class _FailsOnce(dict):  # type: ignore[type-arg]
    """aiohttp's table of connections, made to fail the next time it is listed."""

    armed = True

    def keys(self):  # type: ignore[no-untyped-def]
        if self.armed:
            self.armed = False
            raise RuntimeError("an aiohttp internal changed")
        return super().keys()


async def test_the_slowloris_sweep_goes_on_after_a_failure(start_hub: StartHub) -> None:
    hub = await start_hub(limits={"request_timeout": 0.2})
    server = hub._runner.server
    assert server is not None
    # What the sweep reads (through Server.connections) fails once, as it would if
    # an upgrade changed it: the sweep must still run afterwards.
    table = server._connections = _FailsOnce(server._connections)
    await wait_until(lambda: not table.armed, timeout=2)
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        writer.write(b"GET /channels/chat HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by a later sweep
    finally:
        writer.close()


async def test_answers_before_routing_get_the_response_headers(serve: Serve) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=request.match_info.route.resource.canonical)

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner, port = await serve(app)
    headers_before_routing(runner)  # read by each new connection

    async def exchange(raw: bytes) -> tuple[dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            head, _, body = (await asyncio.wait_for(reader.read(), 5)).partition(b"\r\n\r\n")
        finally:
            writer.close()
        lines = head.decode().split("\r\n")
        fields = (line.partition(":") for line in lines[1:])
        return {"status": lines[0].split()[1], **{k: v.strip() for k, _, v in fields}}, body

    headers, _ = await exchange(b"\x16\x03\x01garbage\r\n\r\n")
    assert headers["status"] == "400"
    assert {k: headers[k] for k in RESPONSE_HEADERS} == RESPONSE_HEADERS
    # A routed request is untouched by it (its app's own signals decide), and routed.
    headers, body = await exchange(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (headers["status"], body) == ("200", b"/hello")
    assert "X-Content-Type-Options" not in headers
