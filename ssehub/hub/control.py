"""This process's side of the control plane: its streams by session and user, disconnects,
refused reconnects, streams per user, and the end of streams that lived long enough.

The HTTP handler registers each stream (``track``) in the same synchronous step as it
subscribes it, and lets it go (``forget``) in its ``finally``; control commands
(``apply``) come from Redis through the node's listener (redis/control.py), in a
worker through the node's feed. Nothing here is on the delivery path, and nothing
waits: a check at connect is a dict lookup.

Per stream this keeps one dict entry (and, with ``limits.max_stream_seconds``, one heap
entry for the one timer of the whole process): no timer, task or future per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..config import Config
from ..core import sse
from ..core.control import (
    DISCONNECT_EVENT,
    Command,
    Disconnect,
    Refusals,
    Refuse,
    credential_key,
    farewell,
    user_key,
)

if TYPE_CHECKING:
    from .channel import Subscriber

__all__ = ["Control", "ControlStats", "UserGate"]

# How often the lifetime timer looks at its heap (seconds).
_TICK = 1.0
# A stream ends after a random share of limits.max_stream_seconds in this range, so
# streams opened together (after a deploy) do not all come back together.
JITTER = (0.75, 1.0)


class ControlStats:
    """Plain counters of the control plane in one process, read at scrape time."""

    __slots__ = (
        "disconnect_requests",
        "disconnected",
        "proxy",
        "publish_messages",
        "publish_requests",
        "refused",
    )

    def __init__(self) -> None:
        self.disconnected: Counter[str] = Counter()  # streams ended, by target
        self.refused = 0  # connects refused after a reconnect: false disconnect
        self.publish_requests: Counter[str] = Counter()  # POST /publish, by result
        self.publish_messages = 0  # messages POST /publish handed to Redis
        self.disconnect_requests: Counter[str] = Counter()  # POST /disconnect, by result
        self.proxy: Counter[str] = Counter()  # auth: proxy, by outcome


class UserGate(Protocol):
    """Counts a user's streams where the node's processes meet (with workers: main), so
    that ``limits.max_per_user`` bounds them on the node, not in each process."""

    async def hold(self, user: str) -> int:
        """A token (> 0) for one more stream of ``user``; -1: the node has enough."""
        ...

    def release(self, token: int) -> None: ...


class Control:
    """Streams of this process by session and user; what control commands do to them."""

    def __init__(self, get_config: Callable[[], Config]) -> None:
        self._get_config = get_config
        self.refusals = Refusals()
        self.stats = ControlStats()
        # session id -> (stream, user, credential); "" where there is none.
        self._streams: dict[str, tuple[Subscriber, str, str]] = {}
        self._users: dict[str, set[Subscriber]] = {}
        # With workers: main counts users' streams for the node (supervisors/worker.py),
        # and each stream here holds a token of it (session id -> token).
        self.gate: UserGate | None = None
        self._holds: dict[str, int] = {}
        # (end time, tie-break, stream): streams to end for limits.max_stream_seconds.
        self._ends: list[tuple[float, int, Subscriber]] = []
        self._timer: asyncio.TimerHandle | None = None
        # A session refused by its credential: every node must hear of it (the
        # node's listener writes it to Redis and tells the others).
        self.on_refuse: Callable[[Refuse], None] | None = None

    # --- connects ----------------------------------------------------------------

    def refused_until(self, user: str, credential: str) -> float:
        """When this user's or credential's refused reconnects end (0: not refused)."""
        keys = []
        if user:
            keys.append(user_key(user))
        if credential:
            keys.append(credential_key(credential))
        return self.refusals.until(*keys) if keys else 0.0

    def over_user_limit(self, user: str) -> bool:
        """Whether ``user`` already has ``limits.max_per_user`` streams here."""
        limit = self._get_config().limits.max_per_user
        return bool(user and limit and len(self._users.get(user, ())) >= limit)

    async def hold_user(self, user: str) -> int:
        """Count one more stream of ``user`` on the node, before it registers: 0 when
        nothing is counted beyond this process (no gate, no limit, no user), a token to
        give ``track`` (or ``release_user``), or -1 when the node has enough of them."""
        if self.gate is None or not user or not self._get_config().limits.max_per_user:
            return 0
        return await self.gate.hold(user)

    def release_user(self, token: int) -> None:
        """Give back a ``hold_user`` token of a stream that never registered."""
        if token > 0 and self.gate is not None:
            self.gate.release(token)

    def track(self, sub: Subscriber, user: str = "", credential: str = "", hold: int = 0) -> None:
        """A stream registered (in the step that subscribed it), with its ``hold_user``."""
        self._streams[sub.session] = (sub, user, credential)
        if hold > 0:
            self._holds[sub.session] = hold
        if user:
            self._users.setdefault(user, set()).add(sub)
        seconds = self._get_config().limits.max_stream_seconds
        if seconds:
            end = time.monotonic() + seconds * random.uniform(*JITTER)
            heapq.heappush(self._ends, (end, id(sub), sub))

    def forget(self, sub: Subscriber) -> None:
        """The stream ended (its heap entry, if any, goes when its time comes)."""
        entry = self._streams.pop(sub.session, None)
        hold = self._holds.pop(sub.session, 0) if self._holds else 0
        self.release_user(hold)
        if entry is not None and entry[1]:
            subs = self._users.get(entry[1])
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._users[entry[1]]

    def load(self, refusals: list[Refuse]) -> None:
        """Refusals read from Redis (at start, after a reconnect), or a worker's snapshot."""
        for refusal in refusals:
            self.refusals.add(refusal.key, refusal.until)

    def __len__(self) -> int:
        return len(self._streams)

    def users(self) -> int:
        """Users with at least one stream here."""
        return len(self._users)

    # --- commands ------------------------------------------------------------------

    def apply(self, command: Command) -> int:
        """Carry out a control command here; returns the streams it ended."""
        if isinstance(command, Refuse):
            self.refusals.add(command.key, command.until)
            return 0
        until = command.until or self.refuse_until(command)
        if not command.reconnect and command.target == "user":
            self.refusals.add(user_key(command.value), until)
        ended = 0
        for sub, _, credential in self._targets(command):
            if not command.reconnect and command.target == "session_id" and credential:
                refusal = Refuse(credential_key(credential), until)
                self.refusals.add(refusal.key, until)
                if self.on_refuse is not None:
                    self.on_refuse(refusal)
            self._disconnect(sub, farewell(command))
            ended += 1
        self.stats.disconnected[command.target] += ended
        return ended

    def refuse_until(self, command: Disconnect) -> float:
        """When a ``reconnect: false`` command's refusal ends, counted from now."""
        seconds = command.refuse_seconds or self._get_config().control.refuse_seconds
        return time.time() + seconds

    def _targets(self, command: Disconnect) -> list[tuple[Subscriber, str, str]]:
        if command.target == "session_id":
            entry = self._streams.get(command.value)
            return [entry] if entry is not None else []
        if command.target == "user":
            return [self._streams[s.session] for s in self._users.get(command.value, ())]
        # A channel: a stream following it (or, for a family's name, one of its members).
        name = command.value
        return [
            entry
            for entry in self._streams.values()
            if any(c.name == name or c.label == name for c in entry[0].channels)
        ]

    def _disconnect(self, sub: Subscriber, data: str) -> None:
        """Tell the page why, then end its stream cleanly."""
        raw = sse.encode(data, event=DISCONNECT_EVENT)
        # A closed transport (its handler not yet unsubscribed) raises on uvloop.
        with contextlib.suppress(RuntimeError):
            sub.transport.write(sse.chunk(raw) if sub.chunked else raw)
        sub.end("disconnect")

    # --- streams that lived long enough --------------------------------------------

    def start(self) -> None:
        """One timer for every stream's lifetime, not one per connection."""
        self._timer = asyncio.get_running_loop().call_later(_TICK, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        # Re-armed first: whatever happens below, the timer must not stop for good.
        self._timer = asyncio.get_running_loop().call_later(_TICK, self._tick)
        now = time.monotonic()
        ends = self._ends
        while ends and ends[0][0] <= now:
            _, _, sub = heapq.heappop(ends)
            if self._streams.get(sub.session, (None,))[0] is sub:
                sub.end("lifetime")
        if len(ends) > 1024 and len(ends) > 2 * len(self._streams):
            # Entries of streams gone earlier would otherwise stay until their time.
            self._ends = [e for e in ends if self._streams.get(e[2].session, (None,))[0] is e[2]]
            heapq.heapify(self._ends)
