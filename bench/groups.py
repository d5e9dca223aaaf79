"""One hub flush with many distinct ``/events`` groups, in process, no sockets.

Each group is one subscriber following a random set of channels (what a client
population picking random subsets produces); the transports are stubs that count
bytes, so the figure is the hub's own work per flush: building each group's bytes
and the write calls. Run against another checkout with ``PYTHONPATH=<checkout>``.

    .venv/bin/python -m bench.groups                      # 1,000 groups
    .venv/bin/python -m bench.groups --groups 100,1000,10000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import time
from typing import Any

from ssehub.config import Limits, parse
from ssehub.hub.channel import Subscriber
from ssehub.hub.hub import Hub

CHANNELS = 32


class StubTransport:
    """Enough of a transport for the hub's writes: counts what it is given."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def build(groups: int, seed: int = 1) -> Hub:
    """A hub with ``groups`` distinct channel sets of 2-8 channels, one subscriber each."""
    names = [f"c{i}" for i in range(CHANNELS)]
    # No group limit (where the checkout under test has one).
    limits = {"max_event_groups": 0} if "max_event_groups" in _fields(Limits) else {}
    config = parse({"channels": {n: {"history": 0} for n in names}, "limits": limits})
    hub = Hub(config)
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    seen: set[frozenset[str]] = set()
    while len(seen) < groups:
        chosen = rng.sample(names, rng.randint(2, 8))
        if frozenset(chosen) in seen:
            continue
        seen.add(frozenset(chosen))
        channels = tuple(hub.channels[n] for n in chosen)
        stub: Any = StubTransport()
        hub.subscribe(Subscriber(stub, True, loop.create_future(), channels), None, True)
    return hub


def time_flush(hub: Hub, channels: list[str], rounds: int) -> float:
    """Median seconds of one flush carrying one message per entry of ``channels``."""
    payload = b"~" + b"x" * 99
    times = []
    for _ in range(rounds):
        for name in channels:
            hub.publish(name.encode(), payload)
        start = time.perf_counter()
        hub.flush()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="1000", help="comma-separated group counts")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    for groups in (int(g) for g in args.groups.split(",")):
        hub = build(groups)
        one = time_flush(hub, ["c0"], args.rounds)
        burst = time_flush(hub, ["c0"] * 100, args.rounds)
        every = time_flush(hub, [f"c{i}" for i in range(CHANNELS)], args.rounds)
        print(
            f"groups={groups} one_msg_ms={one * 1000:.3f} "
            f"100_msgs_one_channel_ms={burst * 1000:.3f} "
            f"one_msg_on_each_of_{CHANNELS}_channels_ms={every * 1000:.3f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
