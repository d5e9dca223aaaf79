"""Headers every answer of the hub's listeners carries, whatever produced it."""

from __future__ import annotations

from aiohttp import web

__all__ = ["RESPONSE_HEADERS", "add_response_headers"]

# No content sniffing (a 404 or 400 quotes what the client sent, as text/plain), and
# no software version to fingerprint: aiohttp's default names Python's and its own.
RESPONSE_HEADERS = {"Server": "ssehub", "X-Content-Type-Options": "nosniff"}


async def _add(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(RESPONSE_HEADERS)


def add_response_headers(app: web.Application) -> None:
    """``RESPONSE_HEADERS`` on every response of ``app`` (streams, errors, 404s included)."""
    app.on_response_prepare.append(_add)
