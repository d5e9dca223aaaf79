"""A new worker's snapshot: plain data in bounded frames, rebuilt into the worker hub's
own budget (issue 19, defect 5), with ids and history exact."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from ssehub.core.history import RAW
from ssehub.hub.hub import Hub
from ssehub.supervisors.feed import FrameProtocol, FrameReader, Kind, frame
from ssehub.supervisors.slots import Slot
from ssehub.supervisors.snapshot import CHUNK, Receiver, Snapshot, take

from .conftest import hub_config

CHANNELS = {
    "chat": {"history": 500},
    "orders": {"format": "json", "history": 50},
    "user.*": {"redis_channel": "app:user:*", "history": 20, "history_ttl": 60},
}


def main_hub(**limits: Any) -> Hub:
    """Main's hub with history in every kind of channel (no Redis: nothing connects)."""
    hub = Hub(hub_config("redis://127.0.0.1:1/0", CHANNELS, limits=limits))
    hub.acquire(["user.7"])
    for i in range(300):
        hub.publish(b"chat", b"c%d " % i + b"x" * 4000)
    for i in range(60):  # publisher ids, one of them used twice
        hub.publish(b"orders", b'{"id": "o%d", "data": "%d"}' % (i % 59, i))
    for i in range(30):
        hub.publish(b"app:user:7", b"u%d" % i)
    return hub


def taken(hub: Hub) -> Snapshot:
    return take(
        hub,
        config=hub.config,
        log_level=None,
        state="up",
        reconnects=0,
        live=[],
        streams=[],
        streams_state="up",
    )


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


async def test_a_worker_rebuilds_the_histories_in_its_own_budget_exactly(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    main = main_hub()
    snap = taken(main)
    frames = list(snap.frames())
    receiver = Receiver(pair[1])
    sender = threading.Thread(target=lambda: [pair[0].sendall(f) for f in frames])
    sender.start()
    header = receiver.header()
    worker = receiver.hub(header)
    sender.join()
    # Every kept byte counts in the worker hub's budget, as in main's.
    assert main.budget.bytes > 1_000_000
    assert worker.budget.bytes == main.budget.bytes
    assert worker.budget.count == main.budget.count
    assert (worker.epoch, worker.seq, worker.outage_seq) == (main.epoch, main.seq, main.outage_seq)
    for name, channel in main.channels.items():
        mine = worker.channels[name]
        assert mine.history.entries() == channel.history.entries(), name
        assert mine.history.evicted_seq == channel.history.evicted_seq, name
        assert mine.last_seq == channel.last_seq, name
    # Publisher ids resolve as in main (the reused one to its last entry).
    for i in range(59):
        assert worker.channels["orders"].history.seq_of(f"o{i}") == main.channels[
            "orders"
        ].history.seq_of(f"o{i}")
    # A reload of the hub's bound applies to what the snapshot brought.
    limit = main.budget.bytes // 2
    worker.reload(hub_config("redis://127.0.0.1:1/0", CHANNELS, limits={"history_bytes": limit}))
    assert 0 < worker.budget.bytes <= limit
    assert worker.stats.evicted[("chat", "hub")] > 0


def test_no_frame_is_much_larger_than_a_chunk() -> None:
    main = main_hub()
    frames = list(taken(main).frames())
    biggest_entry = max(len(e[RAW]) for c in main.channels.values() for e in c.history.entries())
    assert len(frames) > 3  # header, chat in more than one chunk, ..., end
    assert all(len(f) <= CHUNK + biggest_entry + 4096 for f in frames)
    reader = FrameReader()
    kinds = [op[0] for data in frames for ops in reader.feed(data) for op in ops]
    assert kinds[0] == Kind.SNAPSHOT and kinds[-1] == Kind.SNAPSHOT_END
    assert set(kinds[1:-1]) == {Kind.HISTORY}


async def test_a_large_snapshot_goes_out_as_the_worker_reads_with_live_frames_behind(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Main never holds much more than a chunk of it in the socket's buffer (the feed's
    bound), however large the history: a worker that reads slowly paces it."""
    main = main_hub(history_bytes=64 << 20)
    for i in range(1500):  # about 6 MB more
        main.publish(b"chat", b"m%d " % i + b"y" * 4000)
    main.channels["chat"].history.resize(2000, 0, float("inf"))
    for i in range(1500):
        main.publish(b"chat", b"n%d " % i + b"y" * 4000)
    snap = taken(main)
    total = sum(len(f) for f in snap.frames())
    assert total > 6 * CHUNK
    loop = asyncio.get_running_loop()
    ours, theirs = pair
    _, link = await loop.create_unix_connection(lambda: FrameProtocol(lambda ops: None), sock=ours)
    assert link.transport is not None
    slot = Slot(0)
    slot.link, slot.queued = link, []
    sending = asyncio.ensure_future(slot.send_snapshot(link, snap))
    slot.write(frame([(Kind.PING, 1)]))  # the node goes on meanwhile: this waits behind
    theirs.setblocking(False)
    got = bytearray()
    most = 0
    while not sending.done() or len(got) < total + 20:
        most = max(most, link.transport.get_write_buffer_size())
        try:
            data = await asyncio.wait_for(loop.sock_recv(theirs, 64 << 10), 5)
        except TimeoutError:
            break
        got += data
        await asyncio.sleep(0)  # (a worker busy building its hub between reads)
    await sending
    assert most <= 2 * CHUNK, most
    reader = FrameReader()
    kinds = [op[0] for ops in reader.feed(bytes(got)) for op in ops]
    assert kinds[0] == Kind.SNAPSHOT
    assert kinds[-2:] == [Kind.SNAPSHOT_END, Kind.PING]  # the live frame came after it
    assert slot.queued is None
    link.transport.close()
