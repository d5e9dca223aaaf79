"""Every assumption ssehub makes about aiohttp beyond its documented API, in one place.

The hub writes event bytes straight to the transport behind aiohttp's response writer,
relies on the order of ``on_response_prepare``, reads a private attribute of aiohttp's
request handler, and answers ``Expect:`` itself. Each assumption is one small function
here, saying what it relies on; ``tests/test_aiohttp_compat.py`` checks each against the
installed aiohttp, and ``pyproject.toml`` pins aiohttp to the versions that passed, so an
upgrade that breaks one fails a test instead of silently turning a protection off.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from ..logs import fields
from .headers import RESPONSE_HEADERS

__all__ = [
    "HeadWithBody",
    "QuietBadRequests",
    "close_connection_after",
    "connections",
    "expect",
    "headers_before_routing",
    "read_no_more",
    "request_in_progress",
    "stream_transport",
]


def stream_transport(request: web.Request) -> asyncio.Transport | None:
    """The transport to write a stream's bytes to directly, or None if it is closing.

    Call only after ``await response.prepare()`` and one ``await response.write()``.
    Relies on: aiohttp's writer sends the buffered headers with the first body write and
    keeps nothing buffered once that write returns, so bytes written to the transport
    from then on follow in order, inside the body; and it keeps no chunked state that
    direct writes upset, so ``write_eof()`` can still add the last chunk.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return None
    return transport


class HeadWithBody(web.StreamResponse):
    """A stream response whose head goes out with its first body bytes, in one write
    (one send on the socket, not two, for every connection of a storm).

    Relies on: ``StreamResponse._send_headers_immediately`` (aiohttp's switch, False
    for ``web.Response``): when False, ``prepare()`` only serialises the head into the
    writer, and the first ``write()`` (or ``write_eof()``) sends it with its bytes.
    """

    _send_headers_immediately = False

    def forget_head(self) -> None:
        """Drop the headers once they went out: ~1.3 KB per stream, for as long as it
        lasts. Call after the first ``write()``.

        Relies on: nothing reads a response's headers once its head was sent (its later
        writes and ``write_eof()`` do not; aiohttp's own access log would, and is off:
        see server.py).
        """
        assert self._payload_writer is not None, "call after the first write()"
        self.headers.clear()


def read_no_more(request: web.Request) -> None:
    """A stream's connection reads no further request (its response is the last, see
    ``close_connection_after``): stop parsing what the client sends and drop the
    connection's request parser, ~0.76 KB per stream for as long as it lasts.

    Relies on: ``RequestHandler.close()`` makes ``data_received`` ignore all input and
    ``start()`` end once this request's handler returns; nothing else uses the
    handler's ``_parser`` then (``pause_reading`` does, for a request body being read:
    a stream reads none), and ``connection_lost`` sets it to None as done here.
    """
    handler = request.protocol
    handler.close()
    handler._parser = None


def close_connection_after(response: web.StreamResponse) -> None:
    """Make ``response`` the last on its connection; call from ``on_response_prepare``.

    Relies on: ``on_response_prepare`` hooks run for every response (streams included)
    before its headers are serialised, so a header set here is sent; but after aiohttp
    chose its ``Connection`` header, hence the header set by hand.
    """
    response.force_close()
    response.headers["Connection"] = "close"


def connections(runner: web.AppRunner) -> list[RequestHandler]:
    """The handlers of the open connections (one per connection).

    Relies on: ``runner.server.connections``, aiohttp's own list of them.
    """
    server = runner.server
    return [] if server is None else list(server.connections)


def request_in_progress(handler: RequestHandler) -> bool:
    """True while ``handler`` holds a request whose head was parsed (streams included).

    Relies on the private ``RequestHandler._current_request``: None until a complete
    request head has arrived, set while the request is handled, None again after it.
    The idle-connection sweep (slowloris) reads it; aiohttp has no header-read timeout.
    """
    return handler._current_request is not None


class _Request(web.Request):
    """A request whose answer gets ``RESPONSE_HEADERS`` even when no route was found."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        if self._match_info is None:  # aiohttp's own answer: no app signal runs for it
            response.headers.update(RESPONSE_HEADERS)
        await super()._prepare_hook(response)


def headers_before_routing(runner: web.AppRunner) -> None:
    """Give ``RESPONSE_HEADERS`` to the answers aiohttp sends before routing (a request
    it cannot parse gets its 400 there), which no ``on_response_prepare`` sees; call
    after ``runner.setup()``, before a site starts.

    Relies on: ``Server.request_factory`` (a public attribute) builds every request
    of a connection, parsed or not; ``Application._make_request`` takes the class to
    build (``_cls``); and ``Request._prepare_hook`` runs for every response before its
    headers are serialised, with ``_match_info`` None when nothing was routed.
    """
    server = runner.server
    assert server is not None, "call after runner.setup()"
    server.request_factory = functools.partial(runner.app._make_request, _cls=_Request)


async def expect(request: web.Request) -> None:
    """The ``Expect:`` header, as each route's ``expect_handler``.

    Nothing here takes a request body, so ``100-continue`` needs no interim answer, and
    anything else is a 417 that does not echo the value. Relies on: a route's
    ``expect_handler`` replaces aiohttp's default one, which echoes the value (a value
    that is not UTF-8 then fails to encode: a 500 for any client that sends one).
    """
    value = request.headers.get("Expect", "")
    if request.version == HttpVersion11 and value.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="unsupported Expect header\n")


class QuietBadRequests(logging.Filter):
    """For the ``aiohttp.server`` logger: a request aiohttp cannot parse on one DEBUG line.

    Relies on: aiohttp answers such a request with a 4xx itself and logs it on
    ``aiohttp.server`` at ERROR with the ``HttpProcessingError`` as ``exc_info``, so any
    client could fill the logs with tracebacks. ``log`` writes the one line.
    """

    def __init__(self, log: logging.Logger) -> None:
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop aiohttp's record of a malformed request, after one line of our own."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            # The kind of error only: aiohttp's message quotes what the client sent (the
            # request line, or the first 100 bytes of an oversized Authorization or
            # Cookie header), and any of it may be a credential.
            self.log.debug("bad request", extra=fields(status=exc.code, reason=type(exc).__name__))
            return False
        return True
