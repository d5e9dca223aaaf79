"""Main's end of the feed (relay.py), in this process: what it does with what workers say."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ssehub.supervisors.feed import Kind
from ssehub.supervisors.multiprocess import Supervisor

from .conftest import hub_config
from .redis_server import RedisServer

FAMILY = {"user.*": {"redis_channel": "app:user:*"}}


@pytest.fixture
async def supervisor(redis_server: RedisServer) -> AsyncIterator[Supervisor]:
    """Main's state, not started: no worker, no Redis connection (nothing needs one)."""
    sup = Supervisor(hub_config(redis_server.url, FAMILY, workers=2))
    yield sup
    await sup.node.tasks.close()


async def test_a_hold_for_a_member_re_created_on_a_worker_is_not_absorbed(
    supervisor: Supervisor, redis_server: RedisServer
) -> None:
    """A reload drops a member a worker's stream holds; the worker creates it again for
    its next stream (a new token) before the old one's release reaches main: main must
    hold the new one, not count it as the old one's second hold and then drop it."""
    hub, slot = supervisor.hub, supervisor.slots[0]
    supervisor._on_worker(slot, [(Kind.HOLD, "user.7", 1)])
    old = hub.channels["user.7"]
    # The family now reads a stream: the member is dropped (and made again on demand).
    hub.reload(hub_config(redis_server.url, {"user.*": {"stream": "app:user:*"}}, workers=2))
    assert "user.7" not in hub.channels
    supervisor._on_worker(slot, [(Kind.HOLD, "user.7", 2), (Kind.RELEASE, "user.7", 1)])
    new = hub.channels.get("user.7")
    assert new is not None and new is not old and new.stream
    assert new.holds == 1
    supervisor._on_worker(slot, [(Kind.RELEASE, "user.7", 2)])
    assert new.holds == 0
