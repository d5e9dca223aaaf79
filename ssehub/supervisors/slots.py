"""The workers' processes: started, fed their snapshot, watched, restarted, stopped.

One ``Slot`` per worker position keeps its current process, its end of the feed and
what main knows of it. ``Workers`` starts a process per slot over a socketpair, sends
it the node's snapshot (a chunk at a time, with everything the node numbered meanwhile
queued behind it), restarts one that dies with a capped backoff (gunicorn's arbiter:
never in a tight loop) and stops them all with SIGTERM. What the node does about a
worker -- its snapshot, what it says, what is left when it is gone -- is main's
(``multiprocess.py``), through the callbacks given here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from prometheus_client.core import Metric

from ..hub.channel import Channel
from ..tasks import Tasks
from .feed import FrameProtocol, Op
from .snapshot import Snapshot

__all__ = ["StartupError", "Slot", "Workers"]

log = logging.getLogger(__name__)

# Restart delays: doubled for each worker that dies within _STABLE seconds of its start.
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 10.0
_STABLE = 10.0
# A worker whose unread feed grows past this is stuck: it is restarted (and catches
# up from a snapshot), like a subscriber that stops reading.
MAX_FEED_BUFFER = 64 << 20
# Seconds for a worker to report it listens, at start-up.
_START_TIMEOUT = 30.0


class StartupError(OSError):
    """A worker exited before it listened (the CLI exits 3, as for a port in use)."""


class Slot:
    """One worker position: its current process, feed link and what main knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.link: FrameProtocol | None = None
        # Frames for this worker while its snapshot is still on its way (they follow it).
        self.queued: list[bytes] | None = None
        self._queued_bytes = 0
        self.ready = False
        self.started = 0.0
        self.failures = 0  # quick deaths in a row (the backoff's exponent)
        self.restarts = 0
        self.last_pong = 0.0
        self.connections = 0
        # Members this worker's streams hold, by the worker's token for its member
        # (one hub hold each): a name may stand for two members in turn, when a
        # reload drops one and the worker makes it again before it let the old go.
        self.held: dict[int, Channel] = {}
        # Its streams counted against limits.max_per_user: token -> user.
        self.users: dict[int, str] = {}
        self.stats: list[Metric] = []
        self.stats_waiter: asyncio.Future[None] | None = None
        # Its streams' registrations not yet ended: (channel, session) -> (meta,
        # presence); left with reason worker_exit should the worker die.
        self.sessions: dict[tuple[str, str], tuple[Any, bool]] = {}

    def write(self, data: bytes) -> None:
        """One frame to this worker, behind everything written before (its snapshot too)."""
        link = self.link
        if link is None or link.transport is None:
            return
        if self.queued is not None:
            self.queued.append(data)
            self._queued_bytes += len(data)
        else:
            link.write(data)
        if link.transport.get_write_buffer_size() + self._queued_bytes > MAX_FEED_BUFFER:
            self.kill("worker not reading its feed")

    def kill(self, why: str) -> None:
        if self.proc is not None and self.proc.returncode is None:
            log.error("%s worker=%d pid=%d", why, self.index, self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def send_snapshot(self, link: FrameProtocol, snapshot: Snapshot) -> None:
        """The snapshot a frame at a time, each once the socket took the one before (so
        neither main's loop nor the feed's bound sees it whole); then what was queued."""
        for data in snapshot.frames():
            if self.link is not link:
                return  # the worker is gone
            link.write(data)
            await link.drained()
        if self.link is link and self.queued is not None:
            queued, self.queued, self._queued_bytes = self.queued, None, 0
            for data in queued:
                link.write(data)


class Workers:
    """Starts a process per slot and keeps it running until ``stop()``."""

    def __init__(
        self,
        count: int,
        on_ops: Callable[[Slot, list[Op]], None],
        snapshot: Callable[[], Snapshot],
        gone: Callable[[Slot], None],
        status: Callable[[], None],
    ) -> None:
        self.slots = [Slot(i) for i in range(count)]
        self._tasks: Tasks | None = None  # the process's, once started
        # What a worker says; the node's state for a new worker, taken in the same
        # step as it starts to get the frames that follow; what to undo when one exits;
        # a worker came or went (systemd's status line).
        self._on_ops = on_ops
        self._snapshot = snapshot
        self._gone = gone
        self._status = status
        self.stopping = False
        self.booted = False
        self._boot: asyncio.Future[None] | None = None

    async def start(self, tasks: Tasks) -> None:
        """Start every worker, its snapshot and its watcher as ``tasks``; returns once all
        of them listen (``listening()``)."""
        self._tasks = tasks
        self._boot = asyncio.get_running_loop().create_future()
        for slot in self.slots:
            await self.spawn(slot)
        await asyncio.wait_for(self._boot, _START_TIMEOUT)
        self.booted = True

    def listening(self) -> None:
        """A worker said it listens: the start is over once every one did."""
        if all(s.ready for s in self.slots) and self._boot is not None and not self._boot.done():
            self._boot.set_result(None)

    async def spawn(self, slot: Slot) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ssehub.supervisors.worker",
                str(child.fileno()),
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=_worker_env(),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        _, link = await loop.create_unix_connection(
            lambda: FrameProtocol(partial(self._on_ops, slot)), sock=parent
        )
        # One synchronous step: the node's state now, and from here on every frame
        # the other workers get, queued behind it until it is sent.
        snapshot = self._snapshot()
        slot.proc, slot.link, slot.ready, slot.queued = proc, link, False, []
        slot.started = slot.last_pong = loop.time()
        log.info("worker started worker=%d pid=%d", slot.index, proc.pid)
        assert self._tasks is not None
        name = f"ssehub-worker-{slot.index}"
        self._tasks.spawn(slot.send_snapshot(link, snapshot), f"{name}-snapshot", forever=False)
        self._tasks.spawn(self._watch(slot, proc, link), f"{name}-watch", forever=False)

    async def _watch(
        self, slot: Slot, proc: asyncio.subprocess.Process, link: FrameProtocol
    ) -> None:
        code = await proc.wait()
        # What it said before it exited (its streams' unsubscribes) is read first.
        await asyncio.wait({link.lost}, timeout=1.0)
        if link.transport is not None:
            link.transport.close()
        slot.link = None
        slot.queued = None
        slot.ready = False
        slot.connections = 0
        self._gone(slot)
        if self.stopping:
            return
        if not self.booted:
            if self._boot is not None and not self._boot.done():
                self._boot.set_exception(
                    StartupError(f"worker {slot.index} exited during start-up (code {code})")
                )
            return
        loop = asyncio.get_running_loop()
        slot.failures = 0 if loop.time() - slot.started > _STABLE else slot.failures + 1
        delay = min(_BACKOFF_MIN * 2 ** max(slot.failures - 1, 0), _BACKOFF_MAX)
        slot.restarts += 1
        log.warning(
            "worker exited worker=%d pid=%d code=%s restart_in=%.1fs",
            slot.index,
            proc.pid,
            code,
            delay,
        )
        self._status()
        await asyncio.sleep(delay)
        if not self.stopping:
            try:
                await self.spawn(slot)
            except OSError as exc:
                log.error("worker restart failed worker=%d error=%s", slot.index, exc)

    async def stop(self, timeout: float) -> None:
        """SIGTERM every worker and wait ``timeout`` for them to drain; kill the late ones."""
        self.stopping = True
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        if waits:
            _, late = await asyncio.wait(waits, timeout=timeout)
            for proc in procs:
                if proc.returncode is None:
                    log.error("worker did not stop in time pid=%d; killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if late:
                await asyncio.wait(late, timeout=5)
        links = {s.link.lost for s in self.slots if s.link is not None}
        if links:
            await asyncio.wait(links, timeout=1.0)


def _worker_env() -> dict[str, str]:
    # Only main talks to systemd (NotifyAccess=main): workers never see its socket.
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    return {k: v for k, v in os.environ.items() if k not in drop}
