"""The events/presence writer (ssehub/redis/events.py) against a real Redis: a retry
never publishes an event twice, also when Redis ran the batch and its answer was lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from ssehub.config import Config, parse
from ssehub.redis.events import EventsWriter
from ssehub.redis.factory import create_writer
from ssehub.tasks import Tasks

from .proxy import Proxy
from .redis_server import RedisServer
from .sseclient import wait_until


@contextlib.asynccontextmanager
async def running_writer(config: Config, node: str = "testnode") -> AsyncIterator[EventsWriter]:
    """The factory's writer for ``config``, its task owned as a node owns it; on the
    way out, it must not have failed."""
    writer = create_writer(config, node)
    tasks = Tasks()
    writer.start(tasks)
    try:
        yield writer
    finally:
        tasks.stopping()  # as a node stops: the writer's task ends now
        await writer.close(2.0)
        await tasks.close()
    assert tasks.failed is None


@contextlib.asynccontextmanager
async def events_heard(port: int) -> AsyncIterator[list[str]]:
    """The session ids of the events published on ``ssehub:events``, as the Redis on
    ``port`` passes them on (subscribed before this yields)."""
    client = aioredis.Redis(port=port)
    pubsub = client.pubsub()
    heard: list[str] = []

    async def listen() -> None:
        async for m in pubsub.listen():
            if m["type"] == "message":
                heard.append(json.loads(m["data"])["session_id"])

    await pubsub.subscribe("ssehub:events")
    while (await pubsub.get_message(timeout=5)) is None:  # the confirmation
        pass
    listening = asyncio.create_task(listen())
    try:
        yield heard
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await pubsub.aclose()
        await client.aclose()


def events_config(redis: dict[str, Any], channels: dict[str, Any] | None = None) -> Config:
    """A config with events on (and ``channels``: presence ones, say)."""
    data = {"channels": channels or {"chat": {}}, "redis": redis, "events": {"enabled": True}}
    return parse(data, source="t")


async def test_an_event_whose_answer_was_lost_is_not_published_again(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """Issue 19: the writer re-sent a whole pipeline of PUBLISH after any error, so a
    batch Redis had run (its answer lost) was published twice."""
    proxy = Proxy(redis_server.port)
    await proxy.start()
    try:
        async with events_heard(redis_server.port) as sessions:
            redis = {"url": proxy.url, "reconnect_min": 0.01, "reconnect_max": 0.05}
            async with running_writer(events_config(redis)) as writer:
                writer.join("chat", "s1", None, False)
                await wait_until(lambda: sessions == ["s1"], timeout=5)
                proxy.cut_reply = True  # the next answer (to the batch with s2) is lost
                writer.join("chat", "s2", None, False)
                await wait_until(lambda: proxy.cuts == 1 and writer.published == 2, timeout=5)
                writer.join("chat", "s3", None, False)  # behind any copy of s2, if one came
                await wait_until(lambda: "s3" in sessions, timeout=5)
                assert sessions == ["s1", "s2", "s3"]
                # Counted when the answer arrives, which may be after the listener heard it.
                await wait_until(lambda: writer.published >= 3, timeout=5)
                assert writer.published == 3
    finally:
        await proxy.stop()
