"""Memory bounds a client cannot bypass: history bytes and age, replay, /events groups."""

from __future__ import annotations

import redis.asyncio as aioredis

from ssehub.config import ChannelConfig, Limits
from ssehub.history import SEQ, Budget, History
from ssehub.history import entry as new_entry

from .conftest import StartHub
from .sseclient import wait_until
from .test_metrics import ADMIN, one, scrape


def sized(seq: int, size: int) -> tuple[int, str, bytes, float]:
    return new_entry(seq, f"e-{seq}", b"x" * size)


# --- history bytes ------------------------------------------------------------------


def test_history_byte_bound_evicts_oldest_first_and_counts() -> None:
    h = History(100, max_bytes=1000, name="chat")
    for seq in range(1, 11):
        h.append(sized(seq, 300), publisher_id=False)
    assert [e[SEQ] for e in h.after(0)] == [8, 9, 10]
    assert h.bytes == 900
    assert h.evicted_seq == 7
    assert h.budget.evicted == {("chat", "bytes"): 7}


def test_an_event_larger_than_the_byte_bound_is_not_kept() -> None:
    h = History(100, max_bytes=100, name="chat")
    h.append(sized(1, 50), publisher_id=False)
    h.append(sized(2, 101), publisher_id=False)
    assert len(h) == 0 and h.bytes == 0
    assert h.evicted_seq == 2


def test_hub_budget_evicts_the_hub_wide_oldest_whatever_the_channel() -> None:
    budget = Budget(limit=1000)
    a = History(100, budget=budget, name="a")
    b = History(100, budget=budget, name="b")
    a.append(sized(1, 400), publisher_id=False)
    b.append(sized(2, 400), publisher_id=False)
    a.append(sized(3, 100), publisher_id=False)
    b.append(sized(4, 400), publisher_id=False)  # 1300 > 1000: seq 1 (a) goes
    assert [e[SEQ] for e in a.after(0)] == [3]
    assert [e[SEQ] for e in b.after(0)] == [2, 4]
    assert budget.bytes == 900 == a.bytes + b.bytes
    assert budget.evicted == {("a", "hub"): 1}
    b.append(sized(5, 400), publisher_id=False)  # then seq 2 (b)
    b.append(sized(6, 200), publisher_id=False)  # then seq 3 (a)
    assert [e[SEQ] for e in a.after(0)] == []
    assert [e[SEQ] for e in b.after(0)] == [4, 5, 6]
    assert budget.evicted == {("a", "hub"): 2, ("b", "hub"): 1}


def test_hub_budget_bookkeeping_stays_proportional_to_what_is_kept() -> None:
    """A busy channel evicting by count next to a quiet one that keeps an old event:
    the stale references behind the quiet one's are swept, not kept forever."""
    budget = Budget()
    quiet = History(10, budget=budget, name="quiet")
    busy = History(5, budget=budget, name="busy")
    quiet.append(sized(1, 10), publisher_id=False)
    for seq in range(2, 100_000):
        busy.append(sized(seq, 10), publisher_id=False)
    assert budget.count == 6
    assert len(budget._seqs) <= 2 * budget.count + 64
    assert budget.evicted == {("busy", "count"): 100_000 - 2 - 5}


def test_history_bytes_defaults() -> None:
    assert ChannelConfig().history_bytes == 16 * 1024 * 1024
    assert Limits().history_bytes == 256 * 1024 * 1024


async def test_large_messages_keep_history_within_its_byte_bound(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(
        {"chat": {"history": 100, "history_bytes": 300_000}, "other": {}},
        limits={"history_bytes": 1_000_000},
        admin=ADMIN,
    )
    big = b"x" * 100_000
    for _ in range(10):
        await redis_client.publish("chat", big)
    await wait_until(lambda: hub.hub.stats.received["chat"] == 10)
    history = hub.hub.channels["chat"].history
    assert len(history) == 2  # 100 KB payloads plus their id lines: two fit in 300,000
    assert history.bytes <= 300_000
    m = await scrape(hub.admin_port)
    assert one(m, "ssehub_history_evicted_total", channel="chat", reason="bytes") == 8
    assert one(m, "ssehub_history_evicted_total", channel="chat", reason="hub") == 0
    assert one(m, "ssehub_history_bytes") == history.bytes

    # The hub-wide bound takes the oldest first: chat's two go before other's.
    for _ in range(9):
        await redis_client.publish("other", big)
    await wait_until(lambda: hub.hub.stats.received["other"] == 9)
    assert len(history) == 0
    assert hub.hub.budget.bytes <= 1_000_000
    m = await scrape(hub.admin_port)
    assert one(m, "ssehub_history_evicted_total", channel="chat", reason="hub") == 2
    assert one(m, "ssehub_history_evicted_total", channel="other", reason="hub") == 0


async def test_expired_events_are_freed_on_a_quiet_channel(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub({"chat": {"history_ttl": 0.2}, "other": {}})
    for i in range(3):
        await redis_client.publish("chat", f"m{i}")
    history = hub.hub.channels["chat"].history
    await wait_until(lambda: hub.hub.stats.received["chat"] == 3)
    assert len(history) == 3
    # No new event and no resume on the channel: the hub's timer frees them.
    await wait_until(lambda: len(history) == 0, timeout=3)
    assert history.bytes == 0
    assert hub.hub.stats.evicted[("chat", "age")] == 3
