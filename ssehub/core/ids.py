"""Every id the hub hands out or reads back, in one place.

- **Epochs**: a process's run, unique without coordination (``new_epoch``).
- **Sequence ids** ``<epoch>-<seq>``: a position in one process's numbering (pub/sub
  channels, and every ``/events`` stream), which ``Numbering`` keeps. ``<epoch>`` is
  unique per process, so an id of another process or node is never taken for one of
  ours.
- **Stream entry ids** ``1700000000000-0``: a stream channel's position, the same on
  every node and after every restart (``parse_stream_id``, ``just_before``). Both
  halves are 64-bit unsigned numbers, as in Redis: anything else is no entry id.
- **``/events`` ids** on a stream following stream channels: ``<epoch>-<seq>``
  followed by one ``~<entry id>`` per stream channel, in the order of the channels'
  names, each entry id written compactly (milliseconds in base 36, then ``-`` and the
  sequence in base 36 when it is not 0): ``mx339x0v-152~lq2k3m9a~lq2k3m8z-3``. One id
  thus resumes every stream channel exactly on any node (``mux_id``, ``split_mux_id``).
- **Session ids**: one per stream, told to the page, named by a publisher's
  ``except``: 96 random bits each (``new_session_id``), so that knowing one's own id
  says nothing about anyone else's.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence

__all__ = [
    "MAX_ENTRY_PART",
    "Numbering",
    "base36",
    "compact",
    "expand",
    "hub_part",
    "just_before",
    "mux_id",
    "new_epoch",
    "parse_stream_id",
    "new_session_id",
    "random_prefix",
    "split_mux_id",
    "stream_order",
]

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"

# Each half of a stream entry id is a 64-bit unsigned integer in Redis.
MAX_ENTRY_PART = 2**64 - 1


def base36(n: int) -> str:
    """``n`` (>= 0) in base 36, lower case."""
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if n == 0:
            return out


# --- epochs and sequence ids ------------------------------------------------------


def new_epoch() -> str:
    """A process's epoch, unique without coordination: its start time in ms (base 36),
    then 40 random bits, so that two hubs started in the same millisecond on two nodes
    never take each other's ids for their own (8 + 8 characters)."""
    return base36(time.time_ns() // 1_000_000) + base36(secrets.randbits(40)).rjust(8, "0")


class Numbering:
    """One process's numbering: its epoch, the last sequence number handed out, and
    the position of the last Redis outage (positions up to it predate the outage).

    Shared by the parts of the hub; a worker takes the node's numbers from its feed.
    """

    __slots__ = ("epoch", "outage_seq", "seq")

    def __init__(self, epoch: str | None = None) -> None:
        self.epoch = new_epoch() if epoch is None else epoch
        self.seq = 0
        self.outage_seq = 0

    def position(self) -> str:
        """The id of the current position: everything up to now has been delivered."""
        return f"{self.epoch}-{self.seq}"

    def seq_of(self, hub_id: str) -> int | None:
        """The seq of an ``<epoch>-<seq>`` id of this epoch (whatever its value), or None."""
        epoch, _, seq = hub_id.rpartition("-")
        if epoch == self.epoch and seq.isdigit() and seq.isascii():
            return int(seq)
        return None

    def own(self, hub_id: str) -> int | None:
        """The seq of an ``<epoch>-<seq>`` id handed out here so far, or None."""
        n = self.seq_of(hub_id)
        return n if n is not None and n <= self.seq else None


# --- stream entry ids -------------------------------------------------------------


def parse_stream_id(value: str) -> tuple[int, int] | None:
    """``"1700000000000-3"`` as ``(ms, seq)``; None when it is no entry id: either half
    not a decimal number, or past Redis's 64-bit range (which Redis would answer
    with an error: a client's id out of range is ``unknown_id`` here, at the door)."""
    ms, sep, seq = value.partition("-")
    if not sep or not (ms.isdigit() and seq.isdigit() and ms.isascii() and seq.isascii()):
        return None
    if len(ms) > 20 or len(seq) > 20:
        return None
    parsed = int(ms), int(seq)
    if parsed[0] > MAX_ENTRY_PART or parsed[1] > MAX_ENTRY_PART:
        return None
    return parsed


def stream_order(entry_id: str) -> tuple[int, int]:
    """A sort key for entry ids; anything that is not one sorts first."""
    parsed = parse_stream_id(entry_id)
    return (-1, -1) if parsed is None else parsed


def just_before(entry_id: str) -> str:
    """The greatest possible entry id below ``entry_id`` (an exclusive start that
    includes ``entry_id`` itself)."""
    ms, seq = stream_order(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{MAX_ENTRY_PART}" if ms > 0 else "0-0"


# --- /events ids --------------------------------------------------------------------


def compact(entry_id: str) -> str:
    """A stream entry id as it stands in an ``/events`` id (``0-0`` for an empty stream)."""
    parsed = parse_stream_id(entry_id)
    if parsed is None:
        return "0"
    ms, seq = parsed
    return base36(ms) + (f"-{base36(seq)}" if seq else "")


def expand(text: str) -> str | None:
    """The entry id ``compact`` wrote, or None when ``text`` is not one."""
    ms, sep, seq = text.partition("-")
    try:
        if not ms.isalnum() or not ms.isascii() or (sep and not (seq.isalnum() and seq.isascii())):
            return None
        expanded = f"{int(ms, 36)}-{int(seq, 36) if sep else 0}"
    except ValueError:
        return None
    return expanded if parse_stream_id(expanded) is not None else None


def mux_id(epoch: str, seq: int, positions: Sequence[str]) -> str:
    """An ``/events`` id: the hub position, then each stream channel's entry id."""
    hub = f"{epoch}-{seq}"
    if not positions:
        return hub
    return hub + "".join("~" + compact(p) for p in positions)


def hub_part(value: str) -> str:
    """The ``<epoch>-<seq>`` an ``/events`` id starts with (the whole of any other id)."""
    return value.partition("~")[0]


def split_mux_id(value: str, streams: int) -> tuple[str, list[str] | None]:
    """An ``/events`` id as its hub part and its ``streams`` entry ids (None when it
    does not carry exactly that many, e.g. the channel list changed)."""
    hub, *rest = value.split("~")
    if len(rest) != streams:
        return hub, None
    positions = [expand(p) for p in rest]
    if any(p is None for p in positions):
        return hub, None
    return hub, [p for p in positions if p is not None]


# --- session and node ids -----------------------------------------------------------


def random_prefix() -> str:
    """A node's name among the nodes sharing one Redis (events, presence entries):
    8 URL-safe characters (48 random bits), no ``:`` or ``.`` in them."""
    return secrets.token_urlsafe(6)


def new_session_id() -> str:
    """A stream's session id: 96 random bits as 16 URL-safe characters (no ``:`` or
    ``.``). Nothing in it is shared with another id, so knowing one's own says
    nothing about anyone else's; unique across processes and nodes by chance alone
    (two alike among a billion ids: about one in 10**11)."""
    return secrets.token_urlsafe(12)
