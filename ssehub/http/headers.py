"""Headers every answer of the hub's listeners carries, whatever produced it."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

__all__ = ["RESPONSE_HEADERS", "Extra", "add_response_headers"]

# No content sniffing (a 404 or 400 quotes what the client sent, as text/plain), and
# no software version to fingerprint: aiohttp's default names Python's and its own.
RESPONSE_HEADERS = {"Server": "ssehub", "X-Content-Type-Options": "nosniff"}

# More work on every response of an app, run inside its one hook (below).
Extra = Callable[[web.Request, web.StreamResponse], None]


def add_response_headers(app: web.Application, *extra: Extra) -> None:
    """``RESPONSE_HEADERS`` on every response of ``app`` (streams, errors, 404s
    included), then each of ``extra``: one ``on_response_prepare`` hook for all, as
    each hook is a coroutine call on every request of a connection storm."""

    async def prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(RESPONSE_HEADERS)
        for add in extra:
            add(request, response)

    app.on_response_prepare.append(prepare)
