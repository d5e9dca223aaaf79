"""The history ring: bounded by count and age, with a record of what was dropped."""

from __future__ import annotations

import time

from ssehub.core.history import SEQ, Entry, History
from ssehub.core.history import entry as new_entry


def entry(seq: int, id: str | None = None) -> Entry:
    return new_entry(seq, id or f"e-{seq}", b"data: %d\n\n" % seq)


def test_keeps_the_last_n_and_remembers_the_newest_evicted() -> None:
    h = History(3)
    for seq in range(1, 6):
        h.append(entry(seq), publisher_id=False)
    assert [e[SEQ] for e in h.after(0)] == [3, 4, 5]
    assert h.evicted_seq == 2
    assert [e[SEQ] for e in h.after(4)] == [5]
    assert list(h.after(5)) == []


def test_size_zero_keeps_nothing() -> None:
    h = History(0)
    h.append(entry(7), publisher_id=False)
    assert len(h) == 0
    assert h.evicted_seq == 7


def test_publisher_ids_resolve_until_evicted() -> None:
    h = History(2)
    h.append(entry(1, "pub-a"), publisher_id=True)
    h.append(entry(2, "pub-b"), publisher_id=True)
    assert h.seq_of("pub-a") == 1
    h.append(entry(3, "pub-c"), publisher_id=True)
    assert h.seq_of("pub-a") is None
    assert h.seq_of("pub-c") == 3


def test_entries_are_untracked_by_the_gc() -> None:
    import gc

    e = entry(1)
    gc.collect()
    assert not gc.is_tracked(e)


def test_age_limit() -> None:
    h = History(10, ttl=0.05)
    h.append(entry(1), publisher_id=False)
    old = time.monotonic()
    while time.monotonic() - old < 0.06:
        pass
    h.append(entry(2), publisher_id=False)
    assert [e[SEQ] for e in h.after(0)] == [2]
    assert h.evicted_seq == 1
