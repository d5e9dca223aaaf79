"""Baseline 2: flask-sse (Redis pub/sub, one connection per subscriber) for gunicorn + gevent.

Subscribers: ``GET /stream?channel=<name>``. Publishers: Redis ``PUBLISH <name>
{"data": …}``, which is what ``flask_sse.sse.publish()`` sends.
"""

from __future__ import annotations

import os

from flask import Flask
from flask_sse import sse

app = Flask(__name__)
app.config["REDIS_URL"] = os.environ["BENCH_REDIS_URL"]
app.register_blueprint(sse, url_prefix="/stream")


@app.route("/healthz")
def healthz() -> str:
    return "ok\n"
