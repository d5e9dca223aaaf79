"""HTTP surface: stream set-up for ``/channels/{name}``, health and readiness."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp.http import HttpVersion11

from . import demo, sse
from .broker import Broker
from .hub import Hub
from .subscriber import Subscriber

__all__ = ["BROKER", "HUB", "create_app"]

HUB = web.AppKey("hub", Hub)
BROKER = web.AppKey("broker", Broker)

STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Tells nginx (and proxies that copy its convention) not to buffer the stream.
    "X-Accel-Buffering": "no",
}


async def stream(request: web.Request) -> web.StreamResponse:
    """Open an event stream on one channel and hold it until either side ends it."""
    hub = request.app[HUB]
    name = request.match_info["name"]
    channel = hub.channels.get(name)
    if channel is None:
        raise web.HTTPNotFound(text=f"unknown channel: {name}\n")

    resp = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    chunked = request.version >= HttpVersion11
    if chunked:
        resp.enable_chunked_encoding()
    else:
        resp.force_close()  # an HTTP/1.0 body ends when the connection does
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    # The first bytes go through aiohttp's writer, which sends the buffered
    # headers with them; after this the hub writes straight to the transport,
    # and aiohttp's writer is not touched again until the final chunk.
    await resp.write(sse.retry(hub.config.retry_ms))
    transport = request.transport
    if transport is None or transport.is_closing():
        return resp

    sub = Subscriber(transport, chunked, asyncio.get_running_loop().create_future())
    hub.subscribe(channel, sub)
    try:
        await sub.waiter
    finally:
        hub.unsubscribe(channel, sub)
    # Ended by the hub (shutdown, channel removed): finish the body cleanly so
    # the browser's EventSource reconnects rather than seeing an error.
    resp.force_close()
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


async def healthz(request: web.Request) -> web.Response:
    """200 while the process serves."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """200 only while the hub holds a live Redis subscription for its channels."""
    broker = request.app[BROKER]
    if broker.ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text=f"not ready: redis {broker.state.value}\n")


def create_app(hub: Hub, broker: Broker) -> web.Application:
    """The public application; streams end cleanly on shutdown."""
    app = web.Application()
    app[HUB] = hub
    app[BROKER] = broker
    app.router.add_get("/channels/{name}", stream)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if hub.config.demo:
        app.router.add_get("/", demo.index(hub))

    async def end_streams(app: web.Application) -> None:
        app[HUB].close_all("shutdown")

    app.on_shutdown.append(end_streams)
    return app
