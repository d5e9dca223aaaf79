"""Many streams waiting for the same thing (a Redis channel confirmed, a stream started),
with one future per thing, never one per stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

__all__ = ["Changes", "Waiters"]


class Waiters:
    """Futures keyed by channel or stream key, shared by everyone who waits for it."""

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: dict[bytes, asyncio.Future[None]] = {}

    async def wait(
        self, keys: Iterable[bytes], done: Callable[[bytes], bool], timeout: float
    ) -> bool:
        """True once ``done(key)`` holds for every key; False after ``timeout``."""
        missing = [k for k in keys if not done(k)]
        if not missing:
            return True
        loop = asyncio.get_running_loop()
        futures = set()
        for key in missing:
            future = self._futures.get(key)
            if future is None:
                future = self._futures[key] = loop.create_future()
            futures.add(future)
        # asyncio.wait, not await: cancelling one waiting stream must not cancel the
        # future other streams share.
        await asyncio.wait(futures, timeout=timeout)
        return all(done(k) for k in missing)

    def wake(self, key: bytes) -> None:
        """``key`` is done: every stream waiting for it goes on."""
        future = self._futures.pop(key, None)
        if future is not None and not future.done():
            future.set_result(None)

    def forget(self, key: bytes) -> None:
        """Nobody will wait for ``key`` any more (it was dropped)."""
        future = self._futures.pop(key, None)
        if future is not None:
            future.cancel()


class Changes:
    """Something that changes now and then (a worker's feed), and the streams waiting
    until a condition on it holds: one shared future, renewed at each change."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next: asyncio.Future[None] | None = None

    async def until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """True once ``condition()`` holds (checked at each change); False after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            left = deadline - loop.time()
            if left <= 0:
                return False
            if self._next is None or self._next.done():
                self._next = loop.create_future()
            await asyncio.wait({self._next}, timeout=left)  # never cancels the shared one
        return True

    def changed(self) -> None:
        """Wake everyone waiting, to check their condition again."""
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
