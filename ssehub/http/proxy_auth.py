"""``auth: proxy``: the hub asks the application whether a browser may open its stream.

For apps with cookie sessions that mint no JWTs (the model of nchan's
``nchan_authorize_request`` and Centrifugo's connect proxy). On a new stream of an
``auth: proxy`` channel the hub POSTs to ``auth.proxy.url``::

    {"channels": ["user.42"], "cookies": {"sessionid": "…"}}

with only the cookies ``auth.proxy.cookies`` names. The application answers
``200 {"user": "42", "channels": ["user.42", "news.*"], "meta": {…}, "expire_at": <unix>}``
-- the channels it grants (exact names, or patterns where ``*`` matches any run, as in
a token's claim) -- or ``401``/``403`` to deny. Whatever else happens (a timeout, a
refused connection, a 5xx, an answer that is not of that shape) is the application
being unavailable: transient, so the stream gets the busy answer (``ssehub-busy``,
reason ``auth_unavailable``) and the browser tries again later; a denial is never
guessed and the door never opens without an answer.

**Cost.** Answers are cached by the cookies sent (at most ``cache_size``, each for
``cache_seconds`` and never past its ``expire_at``), denials too, so reconnects cost
nothing. At most one call per cookie set is in flight on the node (with ``workers: N``
the workers ask main, which asks the application: see ``remote``): a storm of
connects of one session waits for one answer
(a failed call fails its waiters too, rather than each trying again), and aiohttp's
connector holds at most 100 connections to the application. A stream's ``expire_at``
ends it as a token's ``exp`` does (``ssehub-auth-expired`` first), so the application
is asked again on the reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from ..config import ChannelConfig, Config, ProxyAuthConfig
from ..hub.control import ControlStats
from ..logs import fields
from .auth import Denied, matches
from .auth import _pattern as claim_pattern  # one definition of the claim syntax

__all__ = ["PROXY", "ProxyAuth", "ProxyGrant", "Remote", "Unavailable", "add_proxy_auth"]

log = logging.getLogger(__name__)

_MAX_ANSWER = 64 * 1024  # bytes of an application's answer, at most


class Unavailable(Exception):
    """The application did not answer usefully in time: a transient condition."""


class ProxyGrant:
    """What the application answered for one set of cookies."""

    __slots__ = ("asked", "claims", "credential", "exp", "fresh_until", "meta", "sub")

    def __init__(
        self,
        credential: str,
        asked: frozenset[str],
        claims: tuple[Any, ...],
        sub: str,
        meta: Any,
        exp: float,
        fresh_until: float,
    ) -> None:
        self.credential = credential  # the cookies sent (a session's refusal key)
        self.asked = asked  # the channels the application was asked about
        self.claims = claims  # what it granted (names or patterns): () for a denial
        self.sub = sub  # the user ("" when it named none)
        self.meta = meta
        self.exp = exp  # expire_at (0: none)
        self.fresh_until = fresh_until

    def answers(self, names: Sequence[str], now: float) -> bool:
        """Whether this answer still decides a request for ``names``."""
        return now < self.fresh_until and all(n in self.asked or self.allows(n) for n in names)

    def allows(self, name: str) -> bool:
        return matches(self.claims, name)


# Where a worker's ProxyAuth gets its answers: main's ``answer`` (supervisors/worker.py).
Remote = Callable[[str, list[str], dict[str, str]], Awaitable[ProxyGrant]]


class ProxyAuth:
    """Asks the application about streams of ``auth: proxy`` channels; caches the answers.

    ``remote``: with workers, a worker's answers come from main (which caches them and
    calls the application for the whole node); the worker decides on them.
    """

    def __init__(
        self, get_config: Callable[[], Config], stats: ControlStats, remote: Remote | None = None
    ) -> None:
        self._get_config = get_config
        self._stats = stats.proxy
        self.remote = remote
        self._session: aiohttp.ClientSession | None = None
        self._cache: dict[str, ProxyGrant] = {}
        self._config: ProxyAuthConfig | None = None  # what the cached answers were asked with
        self._inflight: dict[str, asyncio.Future[ProxyGrant]] = {}

    async def grant(
        self, request: web.Request, channels: Sequence[tuple[str, ChannelConfig]]
    ) -> ProxyGrant | None:
        """The application's grant for the ``auth: proxy`` channels among ``channels``
        (None when there is none); raises Denied (403) or Unavailable."""
        names = [name for name, cfg in channels if cfg.auth == "proxy"]
        if not names:
            return None
        proxy = self._proxy()
        cookies = {n: request.cookies[n] for n in proxy.cookies if n in request.cookies}
        key = json.dumps(sorted(cookies.items()), separators=(",", ":"))
        if self.remote is not None:
            answer = await self.remote(key, names, cookies)
        else:
            answer = await self.answer(key, names, cookies)
        return self._decide(answer, names)

    def _proxy(self) -> ProxyAuthConfig:
        auth = self._get_config().auth
        if auth is None or auth.proxy is None:  # pragma: no cover - config validation
            raise Unavailable("no auth.proxy configured")
        if auth.proxy is not self._config:
            # A reload changed it (another URL, other cookies): no answer carries over.
            self._config = auth.proxy
            self._cache.clear()
        return auth.proxy

    async def answer(self, key: str, names: list[str], cookies: dict[str, str]) -> ProxyGrant:
        """The application's answer for ``cookies`` (``key``, their canonical form) about
        ``names``: cached, or asked for once however many wait for it; raises
        Unavailable."""
        proxy = self._proxy()
        while True:
            cached = self._cache.get(key)
            if cached is not None and cached.answers(names, time.time()):
                self._stats["cached"] += 1
                return cached
            pending = self._inflight.get(key)
            if pending is None:
                break
            # One call per session in flight: wait for its answer (its failure too).
            await asyncio.shield(pending)
        future: asyncio.Future[ProxyGrant] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            answer = await self._call(proxy, key, names, cookies)
        except BaseException as exc:
            if isinstance(exc, Unavailable):
                self._stats["unavailable"] += 1
            future.set_exception(exc if isinstance(exc, Unavailable) else Unavailable())
            future.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            future.set_result(answer)
        finally:
            del self._inflight[key]
        self._remember(key, answer, proxy)
        return answer

    def _decide(self, answer: ProxyGrant, names: Sequence[str]) -> ProxyGrant:
        denied = [n for n in names if not answer.allows(n)]
        if denied:
            self._stats["denied"] += 1
            raise Denied(403, f"not granted by the application: {', '.join(denied)}")
        self._stats["granted"] += 1
        return answer

    def _remember(self, key: str, answer: ProxyGrant, config: ProxyAuthConfig) -> None:
        if not config.cache_size or answer.fresh_until <= time.time():
            return
        self._cache.pop(key, None)
        while len(self._cache) >= config.cache_size:
            del self._cache[next(iter(self._cache))]  # the oldest answer
        self._cache[key] = answer

    async def _call(
        self, config: ProxyAuthConfig, key: str, names: list[str], cookies: dict[str, str]
    ) -> ProxyGrant:
        self._stats["called"] += 1
        if self._session is None:
            self._session = aiohttp.ClientSession()
        body = {"channels": names, "cookies": cookies}
        try:
            async with self._session.post(
                config.url, json=body, timeout=aiohttp.ClientTimeout(total=config.timeout)
            ) as resp:
                status = resp.status
                text = await resp.content.read(_MAX_ANSWER + 1) if status == 200 else b""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            why = str(exc) or type(exc).__name__
            log.warning("auth proxy unavailable", extra=fields(url=config.url, error=why))
            raise Unavailable(why) from None
        credential = key if cookies else ""
        now = time.time()
        fresh = now + config.cache_seconds
        if status in (401, 403):
            return ProxyGrant(credential, frozenset(names), (), "", None, 0.0, fresh)
        if status != 200:
            log.warning("auth proxy unavailable", extra=fields(url=config.url, status=status))
            raise Unavailable(f"status {status}")
        try:
            return _grant(text, credential, frozenset(names), now, fresh)
        except ValueError as exc:
            log.error("auth proxy answer malformed", extra=fields(url=config.url, error=str(exc)))
            raise Unavailable(str(exc)) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _grant(
    text: bytes, credential: str, asked: frozenset[str], now: float, fresh: float
) -> ProxyGrant:
    """A 200 answer's grant; ValueError names what is wrong with it."""
    if len(text) > _MAX_ANSWER:
        raise ValueError(f"larger than {_MAX_ANSWER} bytes")
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    channels = obj.get("channels")
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise ValueError("channels: expected a list of names")
    user = obj.get("user", "")
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)
    if not isinstance(user, str) or len(user) > 256:
        raise ValueError("user: expected a string")
    exp = obj.get("expire_at") or 0.0
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise ValueError("expire_at: expected a Unix time")
    if exp and exp <= now:
        # Granted until a time already past: the stream would end at once, and its
        # browser would come straight back; nothing is granted by it.
        raise ValueError("expire_at is in the past")
    meta = obj.get("meta")
    if meta is None:
        meta = {"sub": user} if user else None
    elif not isinstance(meta, dict):
        raise ValueError("meta: expected an object")
    fresh_until = min(fresh, exp) if exp else fresh
    claims = tuple(claim_pattern(c) for c in channels)
    return ProxyGrant(credential, asked, claims, user, meta, float(exp), fresh_until)


PROXY = web.AppKey("proxy_auth", ProxyAuth)


def add_proxy_auth(app: web.Application, proxy: ProxyAuth) -> None:
    """Keep ``proxy`` with ``app``; its HTTP session closes with it."""
    app[PROXY] = proxy

    async def close(app: web.Application) -> AsyncIterator[None]:
        yield
        await proxy.close()

    app.cleanup_ctx.append(close)
