"""The garbage collector, kept off the objects of long-lived connections.

A stream's objects (its transport, protocol, request, parser, tasks...) live as long
as the stream, and none of them is ever cyclic garbage once it closes: refcounting
frees them all. Yet every full collection walks each of them again, so a connection
storm's cost grew faster than linearly with the connections already open (10,000
connections: 5 full collections, 0.45-0.58 s of the storm's 2.2-2.9 s of CPU).

So, in every process that serves streams (the single process and each worker; the
workers' main process uses ``freeze`` at start-up only):

- full collections are rarer (``FULL_EVERY`` young collections instead of 10), so a
  storm itself runs none;
- once a storm has settled (``settle``, from the server's periodic sweep), the young
  generations are collected and what survives is frozen, so later full collections
  skip the storm's connections;
- once most of the frozen connections are gone, everything is unfrozen, so the next
  full collection reviews it all once.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from ..logs import fields

__all__ = ["FULL_EVERY", "GROWTH", "Collector", "freeze"]

log = logging.getLogger(__name__)

# Young (generation 1) collections between two full ones; Python's default is 10.
FULL_EVERY = 100
# New connections since the last freeze that make the next sweep freeze again.
GROWTH = 1000


def freeze() -> None:
    """Collect everything, then move what survives out of the collector's way for good
    (start-up: what exists now lives as long as the process)."""
    gc.collect()
    gc.freeze()


class Collector:
    """The collection policy of one serving process; ``full_seconds``: time spent in
    full collections (timed through ``gc.callbacks``), logged with each freeze."""

    def __init__(self, growth: int = GROWTH) -> None:
        self.growth = growth
        self.frozen_at = 0  # connections open at the last freeze
        self.freezes = 0  # freezes after start-up
        self.full_collections = 0
        self.full_seconds = 0.0
        self.active = False  # started: code and tests that embed a server leave it off
        self._started = 0.0
        self._thresholds = gc.get_threshold()

    def start(self) -> None:
        """At start-up, once the process serves: set the thresholds, time the full
        collections, freeze what exists."""
        self._thresholds = threshold0, threshold1, _ = gc.get_threshold()
        gc.set_threshold(threshold0, threshold1, FULL_EVERY)
        if self._timed not in gc.callbacks:
            gc.callbacks.append(self._timed)
        self.active = True
        freeze()

    def stop(self) -> None:
        """Back to the collector's previous settings (what is frozen stays frozen)."""
        if self._timed in gc.callbacks:
            gc.callbacks.remove(self._timed)
        if self.active:
            gc.set_threshold(*self._thresholds)
        self.active = False

    def settle(self, connections: int) -> bool:
        """Freeze once ``connections`` grew by ``growth`` since the last freeze (call
        periodically: a storm has settled by the next call). True when it froze."""
        if not self.active:
            return False
        if connections * 2 < self.frozen_at:
            # Most of the streams frozen last time are gone (refcounting freed them):
            # let the next full collection review everything once, should anything
            # have become cyclic garbage while frozen, and freeze afresh from here.
            gc.unfreeze()
            self.frozen_at = connections
            return False
        if connections - self.frozen_at < self.growth:
            return False
        began = time.perf_counter()
        # Young garbage first (a freeze would keep it for good); not a full collection:
        # it would walk every object of the storm, a pause for every stream.
        gc.collect(1)
        gc.freeze()
        self.frozen_at = connections
        self.freezes += 1
        log.debug(
            "gc frozen",
            extra=fields(
                connections=connections,
                frozen=gc.get_freeze_count(),
                took_ms=round((time.perf_counter() - began) * 1000, 1),
                full_collections=self.full_collections,
                full_ms=round(self.full_seconds * 1000, 1),
            ),
        )
        return True

    def _timed(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.full_collections += 1
            self.full_seconds += time.perf_counter() - self._started
