"""What every ssehub process does the same way: its event loop, its descriptors, its signals.

The one place the event loop is chosen (uvloop where installed), for the single
process, the workers' main and each worker alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["EXIT_FAILED", "capture_signals", "raise_fd_limit", "run"]

T = TypeVar("T")

# A long-lived task ended unexpectedly (see tasks.py): systemd's Restart=on-failure, or
# the main process for a worker, starts a fresh process.
EXIT_FAILED = 1


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop: uvloop where installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a default dependency
        return asyncio.run(main)
    return uvloop.run(main)


def raise_fd_limit() -> None:
    """Every subscriber is a socket: use all the descriptors the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def capture_signals(stop: asyncio.Event, reload: Callable[[], object] | None = None) -> None:
    """SIGTERM and SIGINT set ``stop`` (a graceful shutdown); SIGHUP calls ``reload``.

    Set before the process says it listens: from then on a SIGHUP must not kill it.
    """
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
