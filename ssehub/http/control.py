"""The control plane over HTTP: ``POST /disconnect``, refused reconnects, and its metrics.

``POST /disconnect`` (admin listener, ``Authorization: Bearer <publish key>``) takes the
body a control message has on Redis (``{"disconnect": {"user": "42", "reason": "…",
"reconnect": false}}``: see core/control.py), stores the refusal it makes and publishes
it on ``control.redis_channel``, so that every node -- this one too -- ends those
streams. It answers ``{"nodes": N}``: the listeners that received it.

**A refused reconnect** (a user or a credential refused by ``reconnect: false``) is
answered ``403`` with ``Retry-After`` (the seconds the refusal still holds) and the
reason in the body. A browser's ``EventSource`` gives up for good on it (``readyState
=== CLOSED``): that is the intent -- a logged-out or banned user must not come straight
back with a token that is still valid. Nothing else about it is transient, so the
rule "never strand a browser" (a busy ``200`` for what is transient) does not apply.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from ..config import Config
from ..core import control
from ..core.control import BadControl
from ..hub.control import Control
from ..redis.control import ControlPlane

__all__ = [
    "CONTROL",
    "ControlCollector",
    "Failed",
    "add_disconnect_route",
    "bearer_ok",
    "read_body",
    "refused",
]

CONTROL = web.AppKey("control", Control)
_PLANE = web.AppKey("control_plane", ControlPlane)
_GET_CONFIG: web.AppKey[Callable[[], Config]] = web.AppKey("control_config")


class Failed(Exception):
    """A request answered with an error: its status, text and result label (metrics)."""

    def __init__(self, status: int, text: str, result: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.result = result

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": 'Bearer realm="ssehub"'} if self.status == 401 else None
        return web.Response(status=self.status, text=self.text + "\n", headers=headers)


def bearer_ok(request: web.Request, key: bytes) -> bool:
    """Whether the request carries ``Authorization: Bearer <key>`` (compared in constant time)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), key)


async def read_body(request: web.Request, limit: int, raw: bool = False) -> Any:
    """The request's JSON body (``raw``: its bytes), at most ``limit`` bytes; raises
    Failed (413 when larger, 400 when it is not JSON)."""
    if request.content_length is not None and request.content_length > limit:
        raise Failed(413, f"body larger than {limit} bytes", "too_large")
    body = bytearray()
    async for data in request.content.iter_any():
        body += data
        if len(body) > limit:
            raise Failed(413, f"body larger than {limit} bytes", "too_large")
    if raw:
        return bytes(body)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise Failed(400, f"body: not JSON ({exc})", "bad_request") from None


def refused(until: float) -> web.Response:
    """The answer to a stream request whose user or credential is refused (see above)."""
    seconds = max(1, math.ceil(until - time.time()))
    return web.Response(
        status=403,
        text=f"reconnects refused for {seconds} more seconds (disconnected)\n",
        headers={"Retry-After": str(seconds)},
    )


async def disconnect(request: web.Request) -> web.Response:
    """``POST /disconnect``: see the module's docstring."""
    stats = request.app[CONTROL].stats
    try:
        config = request.app[_GET_CONFIG]()
        settings = config.publish
        if settings is None or not bearer_ok(request, settings.key):
            raise Failed(401, "Authorization: Bearer <publish key> required", "unauthorized")
        body = await read_body(request, settings.max_body_bytes, raw=True)
        try:
            command = control.parse(body)
        except BadControl as exc:
            raise Failed(400, f"body: {exc}", "bad_request") from None
        if not isinstance(command, control.Disconnect):
            raise Failed(400, 'body: expected {"disconnect": {...}}', "bad_request")
        try:
            nodes = await request.app[_PLANE].publish(command)
        except (RedisError, OSError):
            raise Failed(503, "redis unavailable", "redis_unavailable") from None
    except Failed as exc:
        stats.disconnect_requests[exc.result] += 1
        return exc.response()
    stats.disconnect_requests["ok"] += 1
    return web.json_response({"nodes": nodes})


def add_disconnect_route(
    app: web.Application, plane: ControlPlane, control_: Control, get_config: Callable[[], Config]
) -> None:
    """Serve ``POST /disconnect`` on ``app`` (the admin listener)."""
    app[_PLANE] = plane
    app[CONTROL] = control_
    app[_GET_CONFIG] = get_config
    app.router.add_post("/disconnect", disconnect)


class ControlCollector(Collector):
    """The control plane's counters: publishing over HTTP, disconnects, refusals,
    streams per user, ``auth: proxy``."""

    def __init__(self, control_: Control, plane: ControlPlane | None = None) -> None:
        self.control = control_
        self.plane = plane

    def collect(self) -> Iterable[Metric]:
        s = self.control.stats
        for name, doc, counts, known in (
            (
                "ssehub_publish_requests",
                "POST /publish requests, by result.",
                s.publish_requests,
                PUBLISH_RESULTS,
            ),
            (
                "ssehub_disconnect_requests",
                "POST /disconnect requests, by result.",
                s.disconnect_requests,
                ("ok", "bad_request", "unauthorized", "redis_unavailable"),
            ),
            (
                "ssehub_disconnected",
                "Streams ended by a control message, by what it named.",
                s.disconnected,
                control.TARGETS,
            ),
            (
                "ssehub_auth_proxy",
                "Stream requests of auth: proxy channels, by outcome.",
                s.proxy,
                ("cached", "called", "granted", "denied", "unavailable"),
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=[_LABELS[name]])
            for label in sorted(set(known) | set(counts)):
                family.add_metric([label], counts[label])
            yield family
        for name, doc, value in (
            ("ssehub_published_messages", "Messages POST /publish sent.", s.publish_messages),
            ("ssehub_reconnects_refused", "Stream requests refused (reconnect: false).", s.refused),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], value)
            yield counter
        if self.plane is not None:  # the node's (a worker's table is a copy of main's)
            refusals = GaugeMetricFamily("ssehub_refusals", "Users and credentials refused now.")
            refusals.add_metric([], len(self.control.refusals))
            yield refusals
            messages = CounterMetricFamily(
                "ssehub_control_messages", "Control messages from Redis.", labels=["result"]
            )
            messages.add_metric(["ok"], self.plane.received)
            messages.add_metric(["rejected"], self.plane.rejected)
            yield messages


_LABELS = {
    "ssehub_publish_requests": "result",
    "ssehub_disconnect_requests": "result",
    "ssehub_disconnected": "target",
    "ssehub_auth_proxy": "outcome",
}

PUBLISH_RESULTS = (
    "ok",
    "replayed",
    "bad_request",
    "unauthorized",
    "unknown_channel",
    "too_large",
    "conflict",
    "redis_unavailable",
    "redis_error",
)
