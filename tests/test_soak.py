"""A short soak: churning clients, steady messages, one Redis kill -9 (see bench/soak.py)."""

from __future__ import annotations

import logging
import os

import pytest

from bench.soak import SoakConfig, run_soak

from .conftest import StartHub
from .redis_server import RedisServer
from .sseclient import wait_until

pytestmark = pytest.mark.slow


def rss() -> int:
    """This process's RSS: the hub runs in it (with the simulated clients)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_short_soak_loses_nothing_outside_the_outage(
    start_hub: StartHub, caplog: pytest.LogCaptureFixture
) -> None:
    redis = RedisServer()
    redis.start()
    try:
        hub = await start_hub(
            {"soak": {"history": 1000}},
            redis_url=redis.url,
            heartbeat=1,
            redis={"url": redis.url, "reconnect_max": 0.5},
        )
        cfg = SoakConfig(
            clients=200, duration=15, rate=20, restarts=1, down=1.0, max_life=5, sample=0.5
        )
        report = await run_soak(hub.port, redis, cfg, rss)
        summary = report.text() + "".join(f"\nloss: {e}" for e in report.loss_examples)

        assert report.published > 200 and report.streams > cfg.clients, summary
        assert report.streams_failed == 0, summary  # every stream opened, outage or not
        assert report.lost == 0 and report.duplicates == 0, summary
        assert report.delivered == report.expected > 0, summary
        # Those connected across the outage were told, in-band.
        assert report.across_outage > 0, summary
        assert report.across_outage_signalled == report.across_outage, summary
        assert report.streams_ended_by_hub == 0, summary
        assert report.resubscribe_s and max(report.resubscribe_s) < 2.0, summary
        assert report.rss_warm_growth_mb < 10, summary

        await wait_until(lambda: hub.hub.connections == 0, timeout=5)
        assert hub.hub.stats.slow_cut == 0
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], errors
    finally:
        redis.stop()
