"""The operators' listener: ``/metrics``, ``/channels/<name>/presence``, and
``/healthz``/``/readyz`` as on the public one; with a ``publish`` key, ``POST /publish``
and ``POST /disconnect`` (http/publish.py, http/control.py).

It is a separate aiohttp application on its own socket (``admin.host``/``admin.port``),
so metrics never appear on the port browsers reach and a firewall can tell them apart.
"""

from __future__ import annotations

from aiohttp import web

from ..hub.control import Control
from ..hub.hub import Hub
from ..redis.control import ControlPlane
from ..redis.pubsub import PubSubSource
from .app import BROKER, HUB, healthz, readyz
from .control import add_disconnect_route
from .headers import add_response_headers
from .metrics import Metrics
from .presence import add_presence_route
from .publish import add_publish_route

__all__ = ["METRICS", "create_admin_app"]

METRICS = web.AppKey("metrics", Metrics)


async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text exposition of this hub's registry."""
    body, content_type = request.app[METRICS].exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


def create_admin_app(
    hub: Hub,
    broker: PubSubSource,
    metrics_: Metrics,
    control: Control | None = None,
    plane: ControlPlane | None = None,
) -> web.Application:
    """The admin application: metrics, liveness and readiness; publishing and
    disconnects with a ``publish`` key (``control``: the process's, ``plane``: the node's)."""
    app = web.Application()
    app[HUB] = hub
    app[BROKER] = broker
    app[METRICS] = metrics_
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_presence_route(app, hub)  # GET /channels/<name>/presence, answered from Redis
    if hub.config.publish is not None and control is not None and plane is not None:
        add_publish_route(app, control, lambda: hub.config)
        add_disconnect_route(app, plane, control, lambda: hub.config)
    add_response_headers(app)
    return app
