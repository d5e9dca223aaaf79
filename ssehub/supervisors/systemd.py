"""systemd's notify protocol (``Type=notify``), without libsystemd.

Datagrams go to ``$NOTIFY_SOCKET`` (a path, or an abstract socket when it starts
with ``@``): ``READY=1`` once the hub listens and is subscribed to Redis,
``STATUS=`` with connections and Redis state, ``WATCHDOG=1`` every half
``$WATCHDOG_USEC`` from an event-loop timer -- so a stuck loop stops them and systemd
restarts the service -- ``RELOADING=1``/``READY=1`` around a reload, and
``STOPPING=1`` at shutdown. Without ``$NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from .. import logs

__all__ = ["Notifier", "STATUS_INTERVAL"]

log = logging.getLogger(__name__)

# Seconds between STATUS= refreshes when no watchdog asks for a shorter tick.
STATUS_INTERVAL = 5.0


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. vsock addresses, which a hub under systemd never gets


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


class Notifier:
    """Sends notify datagrams to systemd; every method is a no-op without ``$NOTIFY_SOCKET``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env) if self.address else None
        self._sock: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._status: Callable[[], str] | None = None
        self._alive: Callable[[], bool] | None = None
        self._last_status = ""
        self._failed = False

    @property
    def enabled(self) -> bool:
        """True when running under systemd with ``Type=notify``."""
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value``) as one datagram; False when not sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop on a full socket buffer: a dropped
                # watchdog ping is better than a stalled hub.
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:  # once: systemd gone is not worth a line per tick
                log.warning(
                    "systemd notify failed", extra=logs.fields(socket=self.address, error=str(exc))
                )
                self._failed = True
            return False
        return True

    # --- the state changes ------------------------------------------------------

    def notify_ready(self, status: str | None = None) -> None:
        """Start-up, or a reload, is complete."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={status}")
            self._last_status = status
        self.send(*fields)

    def notify_reloading(self) -> None:
        """A reload begins; ``notify_ready()`` ends it (``Type=notify-reload`` wants the clock)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def notify_stopping(self) -> None:
        """Shutdown begins."""
        self.stop()
        self.send("STOPPING=1")

    def notify_status(self, status: str) -> None:
        """Free-form status for ``systemctl status``; sent only when it changed."""
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    # --- the periodic tick: watchdog pings and status refresh ---------------------

    def start(self, status: Callable[[], str], alive: Callable[[], bool] | None = None) -> None:
        """Tick on the event loop: ``WATCHDOG=1`` when enabled, ``STATUS=`` when changed.

        ``alive`` (the workers' supervisor) holds the pings back while it is false.
        """
        if not self.enabled or self._timer is not None:
            return
        self._status = status
        self._alive = alive
        self._schedule()

    def stop(self) -> None:
        """Stop the tick (at shutdown, so systemd's stop timeout governs from here)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Stop the tick and close the socket."""
        self.stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _interval(self) -> float:
        if self.watchdog_interval is None:
            return STATUS_INTERVAL
        return min(self.watchdog_interval, STATUS_INTERVAL)

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._interval(), self._tick)

    def _tick(self) -> None:
        fields = []
        if self.watchdog_interval is not None and (self._alive is None or self._alive()):
            fields.append("WATCHDOG=1")
        if self._status is not None:
            status = self._status()
            if status != self._last_status:
                self._last_status = status
                fields.append(f"STATUS={status}")
        if fields:
            self.send(*fields)
        self._schedule()
