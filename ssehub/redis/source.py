"""One reconnect state machine for every Redis source, and the tasks a source owns.

A source (the pub/sub ``Broker`` and its Sentinel and Cluster forms, the
``StreamReader`` and its Cluster form) is CONNECTING until it first works, UP while
every part of it works (a single source: its session; a cluster source: the slot map is
known, everything is placed, and every node or slot reader is UP), DOWN after having
been UP. ``Source`` keeps that state, counts reconnects (DOWN -> UP), logs each change
(and the first failure to connect, not every retry) and tells the owner; between
attempts it waits a capped exponential backoff with full jitter (``reconnect_min`` ..
``reconnect_max``), reset once the source is UP. A fault is an exception of an attempt:
logged, backed off, retried; ``RedisVersionError`` is not (retrying cannot help), and
ends ``run()``.

``Parts`` are the tasks a source runs inside (a cluster node's connection, a slot
reader, the Sentinel watch): their owner closes them on purpose; any other end of one
(an exception, or a return) is recorded and raised by the owner's ``run()``, so that
the process's task owner sees it -- never a part that ends silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar

from ..config import RedisConfig
from ..logs import fields
from .info import RedisVersionError

__all__ = ["Backoff", "BrokerState", "Parts", "SessionEnded", "Source", "describe"]


class BrokerState(enum.Enum):
    CONNECTING = "connecting"  # never connected yet
    UP = "up"  # subscribed to every channel (reading every stream)
    DOWN = "down"  # lost after having been up


class Backoff:
    """Capped exponential backoff with full jitter, ``reconnect_min`` up to
    ``reconnect_max``: what every retry in the Redis layer waits."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self._attempt = 0  # the exponent

    def reset(self) -> None:
        """It worked: the next wait starts short again."""
        self._attempt = 0

    def next(self) -> float:
        """The next delay, in seconds (each one up to twice as long, up to the cap)."""
        cfg = self.config
        cap = min(cfg.reconnect_max, cfg.reconnect_min * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        return random.uniform(cfg.reconnect_min / 2, cap)

    async def wait(self, wake: asyncio.Event | None = None, delay: float | None = None) -> None:
        """Wait the next delay (or ``delay``), or until ``wake`` is set."""
        delay = self.next() if delay is None else delay
        if wake is None:
            await asyncio.sleep(delay)
            return
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
        # lands as the awaited call completes, and the hub's stop would hang.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wake.wait()


class SessionEnded(Exception):
    """The current connection is unusable (or the slot map unknown): a fault, retried."""


class Source:
    """A source's state, reconnect count and backoff (see the module's docstring).

    Subclasses name their logger and lines, call ``mark_up()`` when every part works and
    ``fault(why)`` when one fails, and run ``reconnect_forever`` (a single connection)
    or a ``cluster.SlotMapWatcher`` (one connection per master or slot).
    """

    # Per kind of source: its logger and its three lines (up, down, first failure).
    log: ClassVar[logging.Logger] = logging.getLogger(__name__)
    up_line: ClassVar[str] = "redis up"
    down_line: ClassVar[str] = "redis down"
    unavailable_line: ClassVar[str] = "redis unavailable, retrying"

    def __init__(
        self,
        config: RedisConfig,
        on_state: Callable[[BrokerState, BrokerState], None] | None = None,
    ) -> None:
        self.config = config
        self.state = BrokerState.CONNECTING
        self.reconnects = 0  # DOWN -> UP
        self._on_state = on_state
        self._backoff = Backoff(config)
        self._reported = False  # the current outage (or the first connect) was logged

    @property
    def ready(self) -> bool:
        """True while every part of the source works."""
        return self.state is BrokerState.UP

    def up_fields(self) -> dict[str, Any]:
        """What the up line says (the number of channels, streams ...)."""
        return {}

    def where(self) -> dict[str, Any]:
        """What every line says of where Redis is (a URL without credentials)."""
        return {}

    def mark_up(self) -> None:
        """Every part works now."""
        if self.state is BrokerState.UP:
            return
        if self.state is BrokerState.DOWN:
            self.reconnects += 1
        self._backoff.reset()
        self._reported = False
        self._set_state(BrokerState.UP)

    def fault(self, why: str) -> None:
        """A part failed: UP turns DOWN (logged); else the outage's first failure is logged."""
        if self.state is BrokerState.UP:
            self._set_state(BrokerState.DOWN, why)
        elif not self._reported:
            self.log.warning(self.unavailable_line, extra=fields(**self.where(), reason=why))
        self._reported = True

    def _set_state(self, state: BrokerState, why: str = "") -> None:
        old = self.state
        if state is old:
            return
        self.state = state
        if state is BrokerState.UP:
            self.log.info(self.up_line, extra=fields(**self.where(), **self.up_fields()))
        else:
            self.log.warning(self.down_line, extra=fields(**self.where(), reason=why))
        if self._on_state is not None:
            try:
                self._on_state(old, state)
            except Exception:  # like delivery: a listener's bug must not end the source
                self.log.exception(
                    "redis state listener failed", extra=fields(old=old.value, new=state.value)
                )

    async def backoff(self, wake: asyncio.Event | None = None) -> None:
        """Wait before the next attempt (or until ``wake`` is set)."""
        await self._backoff.wait(wake)

    async def reconnect_forever(
        self,
        session: Callable[[], Awaitable[None]],
        idle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``session()`` (which calls ``mark_up()`` once it works) again and again, with the
        backoff between attempts (and ``idle()`` before each); cancel to stop."""
        while True:
            if idle is not None:
                await idle()
            try:
                await session()
            except asyncio.CancelledError:
                raise
            except RedisVersionError as exc:  # not a fault: retrying cannot help
                self.log.error("redis too old", extra=fields(**self.where(), reason=str(exc)))
                raise
            except Exception as exc:  # any failure of an attempt: log, back off, retry
                self.fault(describe(exc))
            await self.backoff()


def describe(exc: BaseException) -> str:
    """An attempt's failure for a log line: a network fault as it says, anything else
    with its type (a bug, probably)."""
    why = str(exc) or type(exc).__name__
    if not isinstance(exc, OSError | SessionEnded):
        why = f"{type(exc).__name__}: {why}"
    return why


class Parts:
    """The tasks a source runs inside it, each ended on purpose or reported."""

    def __init__(self, wake: asyncio.Event | None = None) -> None:
        self._tasks: dict[asyncio.Task[Any], bool] = {}  # task -> closed on purpose
        self._wake = wake
        # The first part that ended on its own, and how: raised by the owner's run().
        self.failure: BaseException | None = None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a part (meant to run until closed)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = False
        task.add_done_callback(self._done)
        return task

    def close(self, task: asyncio.Task[Any]) -> None:
        """End a part on purpose (it finishes in the background)."""
        if task in self._tasks:
            self._tasks[task] = True
            task.cancel()

    def _done(self, task: asyncio.Task[Any]) -> None:
        closed = self._tasks.pop(task, True)
        exc = None if task.cancelled() else task.exception()  # (retrieved, always)
        if closed or self.failure is not None:
            return
        if task.cancelled():
            self.failure = RuntimeError(f"part {task.get_name()} was cancelled")
        else:
            self.failure = exc or RuntimeError(f"part {task.get_name()} ended")
        if self._wake is not None:
            self._wake.set()

    def check(self) -> None:
        """Raise what made a part end on its own, if one did."""
        if self.failure is not None:
            raise self.failure

    async def aclose(self) -> None:
        """Cancel every part and wait for each to end (cancelling again, should one go
        on: a cancel can be lost in a race with what it awaited)."""
        tasks = list(self._tasks)
        for task in tasks:
            self._tasks[task] = True
        while tasks := [t for t in tasks if not t.done()]:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=1.0)
