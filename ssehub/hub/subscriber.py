"""One streaming connection, as the hub sees it: a transport, a framing mode and a way to end it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .channel import Channel, Group

__all__ = ["Subscriber"]


class Subscriber:
    """A connected stream. Kept small and flat: tens of thousands of these live at once.

    The hub writes event bytes straight to ``transport``; the request handler awaits
    ``waiter``, which resolves with the reason when the hub ends the stream cleanly.
    A client that goes away cancels the handler instead (``handler_cancellation``).
    """

    __slots__ = (
        "channels",
        "chunked",
        "expires",
        "group",
        "meta",
        "reason",
        "session",
        "transport",
        "waiter",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        chunked: bool,
        waiter: asyncio.Future[str],
        channels: Sequence[Channel],
    ) -> None:
        self.transport = transport
        self.channels = channels
        # The hub's group this stream receives bytes with (set on subscribe).
        self.group: Group | None = None
        # HTTP/1.1 bodies are chunked; HTTP/1.0 ones (nginx's default upstream
        # protocol) are raw bytes delimited by the connection's close.
        self.chunked = chunked
        self.waiter = waiter
        self.reason = ""
        # When its token expires (Unix time; 0: public, never): see auth.Access.
        self.expires = 0.0
        # Its session id (told to the page in-band) and what the application attached
        # to it (``sessions.meta_of``): see sessions.py.
        self.session = ""
        self.meta: object = None

    def end(self, reason: str) -> None:
        """End the stream cleanly: the handler writes the last chunk and returns."""
        if not self.reason:
            self.reason = reason
        if not self.waiter.done():
            self.waiter.set_result(reason)

    def abort(self, reason: str) -> None:
        """Drop the connection at once, discarding unsent bytes (for stuck clients)."""
        if not self.reason:
            self.reason = reason
        self.transport.abort()
