"""``POST /publish``: publish over HTTP, through Redis, in each channel's own format.

Served on the admin listener (and on the public one with ``publish.public: true``)
when ``publish`` names a key; the request carries it as ``Authorization: Bearer``.
The body is one message ``{"channel", "data", "event"?, "id"?, "retry"?, "except"?}``
or a list of them (at most ``publish.max_batch``, the body at most
``publish.max_body_bytes``). Each goes through Redis -- PUBLISH (SPUBLISH for a
sharded channel on a Cluster) for pub/sub channels and family members, XADD for
stream channels -- so every node delivers it, encoded in the channel's ``format``
and checked by the same parser the hub reads it with: a message the hub would reject
is a 400 here, naming the field. A whole request is checked before anything is sent.

Answers: ``{"channel", "receivers"}`` (pub/sub) or ``{"channel", "id"}`` (the entry id
of a stream channel); a list gets ``{"results": [...]}`` in its order. Errors: 401 (no
or wrong key), 400 (the body, naming the field), 404 (unknown channel), 413 (too
large), 422 (an Idempotency-Key reused for another message), 503 (Redis away), 502
(Redis refused a message: the results say which).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from ..config import ChannelConfig, Config
from ..core.families import Families
from ..core.messages import Rejected, parse, parse_entry
from ..hub.control import Control, ControlStats
from ..logs import fields
from ..redis.factory import create_publisher
from ..redis.publish import Conflict, Message, Publisher, Replayed
from .control import CONTROL, Failed, bearer_ok, read_body

__all__ = ["IDEMPOTENCY_HEADER", "add_publish_route"]

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
_MAX_IDEMPOTENCY_KEY = 255
_FIELDS = frozenset({"channel", "data", "event", "id", "retry", "except"})

PUBLISHER = web.AppKey("publisher", Publisher)
_GET_CONFIG: web.AppKey[Callable[[], Config]] = web.AppKey("publish_config")


def _target(
    config: Config, families: Families, name: Any, where: str
) -> tuple[ChannelConfig, bytes]:
    """The channel (or family) config serving ``name`` and its Redis channel or stream key."""
    if not isinstance(name, str) or not name:
        raise Failed(400, f"{where}.channel: a channel name is required", "bad_request")
    listed = config.channels.get(name)
    if listed is not None and not listed.family:
        return listed, (listed.stream or listed.redis_channel).encode()
    found = families.find(name)
    if found is None:
        shown = name.encode("utf-8", "backslashreplace").decode()[:200]
        raise Failed(404, f"{where}.channel: unknown channel {shown!r}", "unknown_channel")
    family, part = found
    target = family.redis_channel(part)
    if target in _reserved(config):
        # (A member the hub itself would not serve: see the registry.)
        raise Failed(404, f"{where}.channel: unknown channel {name!r}", "unknown_channel")
    return family.config, target


def _reserved(config: Config) -> set[bytes]:
    """Redis channels that carry the hub's own messages, never a channel's events."""
    reserved = {config.control.redis_channel.encode()}
    if config.juggernaut.enabled:
        reserved.add(config.juggernaut.redis_channel.encode())
    return reserved


def _message(config: Config, families: Families, item: Any, where: str) -> tuple[str, Message]:
    """One body item as the Message to send, checked as the hub will read it."""
    if not isinstance(item, dict):
        raise Failed(400, f"{where}: expected an object", "bad_request")
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        raise Failed(400, f"{where}.{unknown[0]}: unknown field", "bad_request")
    channel, target = _target(config, families, item.get("channel"), where)
    if "data" not in item:
        raise Failed(400, f"{where}.data: required", "bad_request")
    given = [f for f in ("event", "id", "retry", "except") if item.get(f) is not None]
    data = item["data"]
    limit = config.limits.max_message_bytes
    fmt = channel.format
    if fmt == "text" and not isinstance(data, str):
        raise Failed(400, f"{where}.data: the text format carries a string", "bad_request")
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    try:
        if channel.stream:
            for name in given:
                if name in ("id", "except"):
                    why = {
                        "id": "a stream channel's event id is its entry id (Redis assigns it)",
                        "except": "a stream entry cannot carry it",
                    }[name]
                    raise Failed(400, f"{where}.{name}: {why}", "bad_request")
            entry = [(b"data", text.encode())]
            if item.get("event") is not None:
                entry.append((b"event", _text(item["event"], f"{where}.event").encode()))
            if item.get("retry") is not None:
                entry.append((b"retry", str(_retry(item["retry"], f"{where}.retry")).encode()))
            parse_entry(fmt, "0-1", dict(entry), limit)
            message = Message("XADD", target, fields=tuple(entry), maxlen=channel.stream_maxlen)
        else:
            if fmt == "text":
                if given:
                    raise Failed(
                        400,
                        f"{where}.{given[0]}: the text format carries only data "
                        "(the channel would need format: json)",
                        "bad_request",
                    )
                payload = text.encode()
            else:
                obj = {k: item[k] for k in ("data", *given)}
                payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
            parse(fmt, payload, limit)
            sharded = config.redis.cluster and channel.sharded
            message = Message("SPUBLISH" if sharded else "PUBLISH", target, payload)
    except Rejected as exc:
        raise Failed(400, f"{where}: {exc.reason}: {exc.detail}", "bad_request") from None
    except UnicodeEncodeError:
        raise Failed(400, f"{where}: a string is not valid UTF-8", "bad_request") from None
    return item["channel"], message


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise Failed(400, f"{where}: expected a string", "bad_request")
    return value


def _retry(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Failed(400, f"{where}: expected a non-negative integer", "bad_request")
    return value


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not key or len(key) > _MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise Failed(
            400,
            f"{IDEMPOTENCY_HEADER}: 1-{_MAX_IDEMPOTENCY_KEY} printable ASCII characters",
            "bad_request",
        )
    return key


class _Families:
    """The config's families, rebuilt when a reload changes the config."""

    def __init__(self) -> None:
        self._config: Config | None = None
        self._families = Families(())

    def of(self, config: Config) -> Families:
        if config is not self._config:
            self._config, self._families = config, Families(config.channels.values())
        return self._families


async def publish(request: web.Request) -> web.Response:
    """``POST /publish``: see the module's docstring."""
    stats = request.app[CONTROL].stats
    try:
        response = await _publish(request, stats)
    except Failed as exc:
        stats.publish_requests[exc.result] += 1
        return exc.response()
    return response


async def _publish(request: web.Request, stats: ControlStats) -> web.Response:
    config = request.app[_GET_CONFIG]()
    settings = config.publish
    if settings is None or not bearer_ok(request, settings.key):
        raise Failed(401, "Authorization: Bearer <publish key> required", "unauthorized")
    key = _idempotency_key(request)
    body = await read_body(request, settings.max_body_bytes)
    single = not isinstance(body, list)
    items = [body] if single else body
    if not items or len(items) > settings.max_batch:
        raise Failed(400, f"body: 1 to {settings.max_batch} messages", "bad_request")
    families = request.app[_FAMILIES].of(config)
    checked = [
        _message(config, families, item, "body" if single else f"body[{i}]")
        for i, item in enumerate(items)
    ]
    messages = [m for _, m in checked]
    try:
        answers = await request.app[PUBLISHER].send(messages, key, settings.idempotency_seconds)
    except (RedisError, OSError) as exc:
        log.warning("publish failed", extra=fields(error=str(exc) or type(exc).__name__))
        raise Failed(503, "redis unavailable", "redis_unavailable") from None
    results: list[dict[str, Any]] = []
    replays = 0
    failed = ""
    for (name, message), answer in zip(checked, answers, strict=True):
        if isinstance(answer, Replayed):
            replays += 1
            answer = answer.answer
        if isinstance(answer, Conflict):
            raise Failed(422, f"{IDEMPOTENCY_HEADER}: {answer}", "conflict")
        if isinstance(answer, Exception):
            failed = failed or "redis_error"
            results.append({"channel": name, "error": str(answer)})
            continue
        what = "id" if message.command == "XADD" else "receivers"
        results.append({"channel": name, what: answer})
    stats.publish_messages += len(messages) - replays - sum(1 for r in results if "error" in r)
    result = failed or ("replayed" if replays and replays == len(messages) else "ok")
    stats.publish_requests[result] += 1
    headers = {"Idempotent-Replayed": "true"} if result == "replayed" else None
    answer_body: Any = results[0] if single else {"results": results}
    return web.json_response(answer_body, status=502 if failed else 200, headers=headers)


_FAMILIES = web.AppKey("publish_families", _Families)


def add_publish_route(
    app: web.Application, control: Control, get_config: Callable[[], Config]
) -> None:
    """Serve ``POST /publish`` on ``app`` (its Redis sender lives with the app); its
    counters are the process's ``control.stats``."""
    app[_GET_CONFIG] = get_config
    app[CONTROL] = control
    app[PUBLISHER] = publisher = create_publisher(get_config().redis)
    app[_FAMILIES] = _Families()
    app.router.add_post("/publish", publish)

    async def close_publisher(app: web.Application) -> AsyncIterator[None]:
        yield
        await publisher.close()

    app.cleanup_ctx.append(close_publisher)
