"""Every long-lived task has an owner: an unexpected end is loud, never silent.

A process starts its tasks (the pub/sub source, the stream reader, the events writer,
a worker's feed, the supervisor's watchers) through one ``Tasks``. When one of them
raises, or returns although it should run until the process stops, the owner logs it
with its traceback, remembers it (``failed``: ``/readyz`` answers 503 from then on)
and calls ``on_failure``, which stops the process with a non-zero exit code -- so
systemd, or the main process for a worker, starts a fresh one. That is gunicorn's
arbiter's answer to a dead worker, applied to a task: a silently dead task is a hub
that looks alive and delivers nothing.

Once the process is stopping (``stopping()``), tasks ending is what is wanted; an
exception is still logged and still makes the exit code non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .logs import fields

__all__ = ["Tasks", "cancel"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Tasks:
    """The owner of one process's tasks."""

    def __init__(self, on_failure: Callable[[], None] | None = None) -> None:
        # Called (once) on the first unexpected end: the process's supervisor stops it.
        self.on_failure = on_failure
        # The name of the first task that ended unexpectedly; None while all is well.
        self.failed: str | None = None
        self._tasks: dict[asyncio.Task[Any], bool] = {}  # task -> runs until stopped
        self._stopping = False

    def spawn(
        self, coro: Coroutine[Any, Any, T], name: str, *, forever: bool = True
    ) -> asyncio.Task[T]:
        """Start ``coro`` as an owned task. ``forever``: it runs until the process stops,
        so a return is a failure too; otherwise only an exception is."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = forever
        task.add_done_callback(self._done)
        return task

    def stopping(self) -> None:
        """The process stops: tasks ending from now on is expected."""
        self._stopping = True

    def _done(self, task: asyncio.Task[Any]) -> None:
        forever = self._tasks.pop(task, False)
        name = task.get_name()
        if task.cancelled():
            if self._stopping:
                return
            # Nothing but the owner cancels an owned task while the process runs.
            log.error("task cancelled unexpectedly", extra=fields(task=name))
        else:
            exc = task.exception()
            if exc is not None:
                log.error("task failed", extra=fields(task=name), exc_info=exc)
            elif forever and not self._stopping:
                log.error("task ended unexpectedly", extra=fields(task=name))
            else:
                return
        self.fail(name)

    def fail(self, what: str) -> None:
        """Mark the process failed (readiness 503, non-zero exit) and tell its supervisor."""
        if self.failed is not None:
            return
        self.failed = what
        if self.on_failure is not None:
            self.on_failure()

    async def close(self) -> None:
        """Cancel every task still running and wait for each to end."""
        self.stopping()
        for task in list(self._tasks):
            await cancel(task)


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end, cancelling again should it go on: a
    cancel can be lost in a race with what the task awaited (asyncio.wait_for on
    3.11), and a stop must never hang on it. What it raised is its owner's to log."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
