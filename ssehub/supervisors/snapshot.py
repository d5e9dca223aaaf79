"""A new worker's start: the node's state as plain data, in frames of bounded size.

Main takes the snapshot in one synchronous step, in the same step as the worker starts
to get the frames every worker gets (``slots.Workers.spawn``): the snapshot and the
frames after it are then the node's whole story, with nothing missing between them.
Taking it copies references to the entries (immutable tuples), which is cheap even for
a full history budget; pickling and writing happen a chunk of at most ``CHUNK`` entry
bytes at a time, each once the socket took the one before, so neither main's event
loop nor the feed's bound ever sees the whole of it at once.

The worker rebuilds each channel's history by appending the entries to its own
channels, so they count against its own hub's budget: a reload of ``history_bytes``
applies to them, the node's limit stays the limit, and metrics and age expiry see them.
Objects with live state (a ``History`` and its ``Budget``) never travel.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..core.history import ID, RAW, SEQ, Entry
from ..hub.hub import Hub
from .feed import FrameReader, Kind, Op, frame
from .worker_hub import WorkerHub

__all__ = ["CHUNK", "Receiver", "Snapshot", "take"]

# Bytes per HISTORY frame, about (an entry larger than this goes alone).
CHUNK = 1 << 20
# What a pickled entry costs besides its bytes and id (the tuple, seq and time).
_PER_ENTRY = 32


@dataclass
class Snapshot:
    """The node's state but its histories (``header``), and each channel's entries."""

    header: dict[str, Any]
    # (channel name, entries oldest first, seqs of the entries with a publisher's id)
    histories: list[tuple[str, list[Entry], set[int]]]

    def frames(self) -> Iterator[bytes]:
        """The frames to send, made one at a time as they are asked for."""
        yield frame([(Kind.SNAPSHOT, self.header)])
        for name, entries, published in self.histories:
            start = size = 0
            for i, e in enumerate(entries):
                size += len(e[RAW]) + len(e[ID]) + _PER_ENTRY
                if size >= CHUNK or i == len(entries) - 1:
                    chunk = entries[start : i + 1]
                    yield frame([(Kind.HISTORY, name, chunk, _published(chunk, published))])
                    start, size = i + 1, 0
        yield frame([(Kind.SNAPSHOT_END,)])


def _published(chunk: list[Entry], published: set[int]) -> list[int]:
    return [e[SEQ] for e in chunk if e[SEQ] in published] if published else []


def take(hub: Hub, **main: Any) -> Snapshot:
    """``hub``'s state now; ``main``: what only main knows (config, Redis state...)."""
    members = [c for c in hub.channels.values() if c.family is not None]
    header = {
        **main,
        "epoch": hub.epoch,
        "seq": hub.seq,
        "outage_seq": hub.outage_seq,
        "members": [(c.name, c.history.evicted_seq) for c in members],
        "channels": {n: (c.last_seq, c.history.evicted_seq) for n, c in hub.channels.items()},
        "positions": {
            n: (c.stream_pos, c.flushed_pos) for n, c in hub.channels.items() if c.stream
        },
    }
    histories = []
    for name, channel in hub.channels.items():
        history = channel.history
        entries = history.entries()
        if entries:
            # The entries a publisher's id finds (the last one to use each id).
            published = {e[SEQ] for e in entries if history.seq_of(e[ID]) == e[SEQ]}
            histories.append((name, entries, published))
    return Snapshot(header, histories)


class Receiver:
    """A worker's end, before its event loop starts: reads the snapshot off the socket
    (blocking: nothing is served without it) and builds the worker's hub from it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.reader = FrameReader()  # may hold the start of the frame after the snapshot
        self._frames: list[list[Op]] = []
        self.later: list[list[Op]] = []  # frames that came after the snapshot

    def _next(self) -> list[Op]:
        while not self._frames:
            data = self._sock.recv(1 << 20)
            if not data:
                raise SystemExit("ssehub worker: the main process went away before the snapshot")
            self._frames = self.reader.feed(data)
        return self._frames.pop(0)

    def header(self) -> dict[str, Any]:
        """The first frame: the node's state but its histories."""
        ((kind, header),) = self._next()
        if kind != Kind.SNAPSHOT:
            raise SystemExit(f"ssehub worker: expected the snapshot first, got {kind!r}")
        return dict(header)

    def hub(self, header: dict[str, Any]) -> WorkerHub:
        """The worker's hub in the node's state: the same epoch, positions and history."""
        config: Config = header["config"]
        hub = WorkerHub(config)
        hub.epoch = header["epoch"]
        hub.seq = header["seq"]
        hub.outage_seq = header["outage_seq"]
        for name, marker in header["members"]:
            hub.add_member(name, marker)
        while True:
            (op,) = self._next()
            if op[0] == Kind.SNAPSHOT_END:
                break
            if op[0] != Kind.HISTORY:
                raise SystemExit(f"ssehub worker: expected the snapshot's history, got {op[0]!r}")
            _, name, entries, published = op
            channel = hub.channels.get(name)
            if channel is not None:
                keyed = set(published)
                for e in entries:  # into the channel's own history, and the hub's budget
                    channel.history.append(e, e[SEQ] in keyed)
        for name, (last_seq, evicted_seq) in header["channels"].items():
            channel = hub.channels.get(name)
            if channel is not None:
                channel.last_seq = last_seq
                channel.history.evicted_seq = max(channel.history.evicted_seq, evicted_seq)
        for name, (stream_pos, flushed_pos) in header["positions"].items():
            channel = hub.channels.get(name)
            if channel is not None:
                channel.stream_pos, channel.flushed_pos = stream_pos, flushed_pos
        hub.seq = header["seq"]
        self.later, self._frames = self._frames, []
        return hub
