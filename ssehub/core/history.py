"""A channel's recent events, kept for Last-Event-ID resume, and the hub-wide byte budget.

Each history is bounded by count, bytes and age; all of them together by the hub's
``Budget``. Every bound evicts oldest first and counts what it dropped, by reason.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Final

__all__ = [
    "AT",
    "ID",
    "RAW",
    "REASONS",
    "SEQ",
    "Budget",
    "Entry",
    "History",
    "entry",
]


# One delivered event: (hub sequence number, wire id, encoded bytes, arrival time).
# A plain tuple of atomic values on purpose: the cyclic GC untracks such tuples, so a
# hub keeping hundreds of thousands of events pays no collector time for them, and
# each costs about half of what an object with its parsed event did.
Entry = tuple[int, str, bytes, float]
SEQ: Final = 0
ID: Final = 1
RAW: Final = 2
AT: Final = 3

# Why an entry left a history: its channel's count, bytes or age bound, or the hub's.
REASONS = ("count", "bytes", "age", "hub")


def entry(seq: int, id: str, raw: bytes) -> Entry:
    """A new entry, stamped now."""
    return (seq, id, raw, time.monotonic())


def _seq(e: Entry) -> int:
    return e[SEQ]


class Budget:
    """The bound on the bytes of every history of a hub together, oldest evicted first.

    Hub sequence numbers increase across channels, so the hub-wide oldest entry is
    found with one FIFO of (history, seq) references in append order, without looking
    at the channels: O(1) per append and eviction, whatever their number. A history
    that drops an entry for its own reasons leaves a stale reference behind, skipped
    when it reaches the front and swept out whenever stale ones outnumber live ones
    (amortised O(1): each reference is added once and removed once).
    """

    __slots__ = ("_histories", "_seqs", "bytes", "count", "evicted", "limit")

    def __init__(
        self, limit: float = float("inf"), evicted: Counter[tuple[str, str]] | None = None
    ) -> None:
        self.limit = limit
        self.bytes = 0  # encoded bytes kept by every history
        self.count = 0  # entries kept by every history
        # (channel, reason) -> entries evicted; the hub's stats share it.
        self.evicted: Counter[tuple[str, str]] = Counter() if evicted is None else evicted
        # Two parallel deques rather than one of tuples: no object per kept entry.
        self._histories: deque[History] = deque()
        self._seqs: deque[int] = deque()

    def _add(self, history: History, e: Entry) -> None:
        self.bytes += len(e[RAW])
        self.count += 1
        self._histories.append(history)
        self._seqs.append(e[SEQ])

    def _settle(self) -> None:
        """Evict the hub-wide oldest entries while over the limit; sweep stale references."""
        histories, seqs = self._histories, self._seqs
        while self.bytes > self.limit and seqs:
            history, seq = histories.popleft(), seqs.popleft()
            if history._entries and history._entries[0][SEQ] == seq:
                history._evict("hub")
        if len(seqs) > 2 * self.count + 64:
            live = [
                (h, s)
                for h, s in zip(histories, seqs, strict=True)
                if h._entries and s >= h._entries[0][SEQ]
            ]
            self._histories = deque(h for h, _ in live)
            self._seqs = deque(s for _, s in live)


class History:
    """The last ``size`` entries, at most ``max_bytes`` of them, none older than ``ttl``
    seconds when ttl > 0; and within the hub's ``budget``.

    ``evicted_seq`` is the sequence number of the newest entry dropped so far: a
    client whose position is older than it has missed something for good.
    """

    __slots__ = (
        "_by_id",
        "_entries",
        "budget",
        "bytes",
        "evicted_seq",
        "max_bytes",
        "name",
        "size",
        "ttl",
    )

    def __init__(
        self,
        size: int,
        ttl: float = 0.0,
        max_bytes: float = float("inf"),
        budget: Budget | None = None,
        name: str = "",
    ) -> None:
        self.size = size
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.budget = Budget() if budget is None else budget
        self.name = name  # the channel, as eviction counters name it
        self._entries: deque[Entry] = deque()
        self._by_id: dict[str, int] = {}  # publisher-given ids -> seq, for lookup
        self.bytes = 0
        self.evicted_seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry, publisher_id: bool) -> None:
        if self.size == 0:
            self.evicted_seq = entry[SEQ]
            return
        self._entries.append(entry)
        self.bytes += len(entry[RAW])
        self.budget._add(self, entry)
        if publisher_id:
            self._by_id[entry[ID]] = entry[SEQ]
        self._bound()
        self.budget._settle()

    def _bound(self) -> None:
        while len(self._entries) > self.size:
            self._evict("count")
        while self.bytes > self.max_bytes:
            self._evict("bytes")
        self.expire()

    def _evict(self, reason: str | None) -> None:
        seq, id, raw, _ = self._entries.popleft()
        self.evicted_seq = seq
        self.bytes -= len(raw)
        budget = self.budget
        budget.bytes -= len(raw)
        budget.count -= 1
        if reason is not None:
            budget.evicted[(self.name, reason)] += 1
        if self._by_id and self._by_id.get(id) == seq:
            del self._by_id[id]

    def resize(self, size: int, ttl: float, max_bytes: float) -> None:
        """Apply new limits (config reload), dropping what no longer fits."""
        self.size = size
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._bound()

    def clear(self) -> None:
        """Drop everything (the channel was removed); not counted as evictions."""
        while self._entries:
            self._evict(None)

    def expire(self) -> None:
        """Drop entries older than ``ttl``."""
        if self.ttl <= 0:
            return
        limit = time.monotonic() - self.ttl
        while self._entries and self._entries[0][AT] < limit:
            self._evict("age")

    def entries(self) -> list[Entry]:
        """Every retained entry, oldest first: a copy (of references), for a snapshot."""
        return list(self._entries)

    def seq_of(self, publisher_id: str) -> int | None:
        """The sequence number of a retained event with this publisher-given id."""
        return self._by_id.get(publisher_id)

    def nth_last(self, n: int) -> Entry | None:
        """The ``n``-th newest retained entry (the oldest of them when fewer are kept)."""
        if not self._entries or n <= 0:
            return None
        return self._entries[-min(n, len(self._entries))]

    def id_at(self, seq: int) -> str | None:
        """The id of the newest retained entry at or before ``seq``; None when the
        history does not reach back that far."""
        entries = self._entries
        i = bisect.bisect_right(entries, seq, key=_seq)
        if i == 0:
            return None
        return entries[i - 1][ID]

    def has_after(self, seq: int) -> bool:
        """Whether an entry newer than ``seq`` is retained."""
        return bool(self._entries) and self._entries[-1][SEQ] > seq

    def after(self, seq: int) -> Iterator[Entry]:
        """Retained entries newer than ``seq``, oldest first.

        Found by bisection: a client catching up calls this once per buffer's worth.
        Not to be held across an await: the ring changes under it.
        """
        entries = self._entries
        if not entries or entries[-1][SEQ] <= seq:
            return iter(())
        i = bisect.bisect_right(entries, seq, key=_seq)
        return (entries[j] for j in range(i, len(entries)))
