"""Publisher payloads (bytes from Redis) to validated events, or a rejection reason."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Event", "Rejected", "parse_text"]


@dataclass(frozen=True, slots=True)
class Event:
    """One event as the publisher meant it, before the hub assigns an id."""

    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class Rejected(Exception):
    """A payload that is not delivered; ``reason`` is a short stable label for logs and metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def parse_text(payload: bytes, max_bytes: int) -> Event:
    """The ``text`` format: the whole payload, as UTF-8, is the event's data."""
    if len(payload) > max_bytes:
        raise Rejected("too_large", f"{len(payload)} bytes > {max_bytes}")
    try:
        data = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", f"byte {exc.start}") from None
    return Event(data=data)
