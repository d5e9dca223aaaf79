"""A channel's recent events, kept for Last-Event-ID resume."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Final

__all__ = ["AT", "ID", "RAW", "SEQ", "Entry", "History", "entry"]


# One delivered event: (hub sequence number, wire id, encoded bytes, arrival time).
# A plain tuple of atomic values on purpose: the cyclic GC untracks such tuples, so a
# hub keeping hundreds of thousands of events pays no collector time for them, and
# each costs about half of what an object with its parsed event did.
Entry = tuple[int, str, bytes, float]
SEQ: Final = 0
ID: Final = 1
RAW: Final = 2
AT: Final = 3


def entry(seq: int, id: str, raw: bytes) -> Entry:
    """A new entry, stamped now."""
    return (seq, id, raw, time.monotonic())


class History:
    """The last ``size`` entries (and none older than ``ttl`` seconds when ttl > 0).

    ``evicted_seq`` is the sequence number of the newest entry dropped so far: a
    client whose position is older than it has missed something for good.
    """

    __slots__ = ("_by_id", "_entries", "evicted_seq", "size", "ttl")

    def __init__(self, size: int, ttl: float = 0.0) -> None:
        self.size = size
        self.ttl = ttl
        self._entries: deque[Entry] = deque()
        self._by_id: dict[str, int] = {}  # publisher-given ids -> seq, for lookup
        self.evicted_seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry, publisher_id: bool) -> None:
        if self.size == 0:
            self.evicted_seq = entry[SEQ]
            return
        self._entries.append(entry)
        if publisher_id:
            self._by_id[entry[ID]] = entry[SEQ]
        while len(self._entries) > self.size:
            self._evict()
        self.expire()

    def _evict(self) -> None:
        seq, id, _, _ = self._entries.popleft()
        self.evicted_seq = seq
        if self._by_id and self._by_id.get(id) == seq:
            del self._by_id[id]

    def resize(self, size: int, ttl: float) -> None:
        """Apply new limits (config reload), dropping what no longer fits."""
        self.size = size
        self.ttl = ttl
        while len(self._entries) > size:
            self._evict()
        self.expire()

    def expire(self) -> None:
        """Drop entries older than ``ttl``."""
        if self.ttl <= 0:
            return
        limit = time.monotonic() - self.ttl
        while self._entries and self._entries[0][AT] < limit:
            self._evict()

    def seq_of(self, publisher_id: str) -> int | None:
        """The sequence number of a retained event with this publisher-given id."""
        return self._by_id.get(publisher_id)

    def after(self, seq: int) -> Iterator[Entry]:
        """Retained entries newer than ``seq``, oldest first."""
        entries = self._entries
        if not entries or entries[-1][SEQ] <= seq:
            return iter(())
        # Walk back from the newest: a resuming client is usually only a little behind.
        i = len(entries)
        while i > 0 and entries[i - 1][SEQ] > seq:
            i -= 1
        return (entries[j] for j in range(i, len(entries)))
