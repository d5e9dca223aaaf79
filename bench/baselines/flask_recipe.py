"""Baseline 1: the classic Flask SSE recipe, as copied from tutorials.

One thread (Flask's threaded dev server) and one Redis pub/sub connection per
subscriber, ``pubsub.listen()`` in a generator. Not ssehub code: run by ``bench/``.
The only additions are an unbounded connection pool (as redis-py had when the recipe
was written), a ``/healthz`` route for readiness and a comment on subscribe,
so headers go out (and the client knows it is subscribed) before the first event.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import redis
from flask import Flask, Response

app = Flask(__name__)
# redis-py >= 6 caps a pool at 100 connections by default; the recipe was written
# when pools were unbounded, and it needs one connection per subscriber.
red = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"], max_connections=20000)


@app.route("/healthz")
def healthz() -> str:
    return "ok\n"


@app.route("/channels/<name>")
def stream(name: str) -> Response:
    def events() -> Iterator[str]:
        pubsub = red.pubsub()
        pubsub.subscribe(name)
        try:
            for message in pubsub.listen():
                if message["type"] == "subscribe":
                    yield ": subscribed\n\n"
                elif message["type"] == "message":
                    yield f"data: {message['data'].decode()}\n\n"
        finally:
            pubsub.close()

    return Response(events(), mimetype="text/event-stream")


if __name__ == "__main__":
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app.run(host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), threaded=True)
