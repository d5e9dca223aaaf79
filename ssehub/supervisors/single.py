"""``workers: 1``: one process runs the node and serves every stream itself.

The supervisor only starts the server, turns signals into a reload or a graceful
stop, and stops the process -- with a non-zero exit code, so that systemd starts a
fresh one -- when a long-lived task ended unexpectedly (see tasks.py).
"""

from __future__ import annotations

import asyncio
import logging

from ..config import Config
from ..logs import fields
from ..server import HubServer
from .process import EXIT_FAILED, capture_signals, raise_fd_limit
from .process import run as run_loop
from .systemd import Notifier

__all__ = ["run", "serve"]

log = logging.getLogger(__name__)


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT (or a failed task), then shut down gracefully;
    SIGHUP reloads. Returns the process's exit code."""
    stop = asyncio.Event()
    server = HubServer(config, Notifier())
    server.tasks.on_failure = stop.set
    capture_signals(stop, server.reload)
    await server.start()
    # Everything allocated so far lives as long as the process: out of the
    # collector's way, as each storm's connections will be once it settled.
    server.collector.start()
    try:
        await stop.wait()
        if server.tasks.failed is not None:
            log.error("stopping: a task failed", extra=fields(task=server.tasks.failed))
        log.info("shutting down", extra=fields(connections=server.hub.connections))
    finally:
        await server.stop()
    return EXIT_FAILED if server.tasks.failed is not None else 0


def run(config: Config) -> int:
    """Blocking entry point used by the CLI; returns the exit code."""
    raise_fd_limit()
    return run_loop(serve(config))
