"""Access control: JWT verification, channel claims, token sources, and expiry of live streams.

A channel with ``auth: token`` is served only to a request carrying a JWT, signed with
the configured key, whose ``ssehub.subscribe`` claim names the channel (exactly, or by a
``*`` pattern). Public channels never look at a token.

The hot path is untouched: a token is checked once, when its stream opens (and a
verified token is remembered by its signature until it expires, so a reconnect storm
does not redo the signature check), and live streams' expiry is driven by one timer
for the whole hub over a heap of ``(time, subscriber)``: no timer per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jwt
from aiohttp import web

from ..config import AuthConfig, ChannelConfig, Config
from ..core import sse
from ..hub.channel import Subscriber

__all__ = [
    "CLAIM",
    "EXPIRED_EVENT",
    "Access",
    "Grant",
    "Denied",
    "Verifier",
    "issue",
    "matches",
]

log = logging.getLogger(__name__)

# The claim naming what the bearer may do: {"ssehub": {"subscribe": ["user.42", "news.*"]}}.
CLAIM = "ssehub"
# The named event a stream gets ``auth.renew_before`` seconds before its token expires.
EXPIRED_EVENT = "ssehub-auth-expired"
# The query parameter a browser's EventSource (which cannot set headers) may use.
QUERY_PARAM = "token"
# How often the hub-wide expiry timer looks at its heap (seconds).
TICK = 1.0


class Denied(Exception):
    """A request that may not open its stream: 401 (no valid token) or 403 (not granted)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> web.HTTPException:
        """The HTTP answer; it names the reason and never echoes the token."""
        text = f"{self.reason}\n"
        if self.status == 403:
            return web.HTTPForbidden(text=text)
        # RFC 6750: tells a client that a (fresh) bearer token is what is missing.
        error = ', error="invalid_token"' if self.reason != "token required" else ""
        challenge = f'Bearer realm="ssehub"{error}'
        return web.HTTPUnauthorized(text=text, headers={"WWW-Authenticate": challenge})


def _pattern(claim: str) -> re.Pattern[str] | str:
    """A claim entry: the exact name, or a regex where each ``*`` matches any run."""
    if "*" not in claim:
        return claim
    return re.compile(".*".join(re.escape(part) for part in claim.split("*")), re.DOTALL)


def matches(claims: Iterable[re.Pattern[str] | str], name: str) -> bool:
    """Whether a concrete channel name is granted by any claim entry."""
    return any(name == c if isinstance(c, str) else c.fullmatch(name) for c in claims)


def _numeric_date(value: Any) -> bool:
    """A JSON number of seconds (RFC 7519 NumericDate): not a string, a boolean, NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Grant:
    """What one verified token allows: the channels it names, until when."""

    __slots__ = ("claims", "exp", "payload", "sub", "token")

    def __init__(self, token: str, payload: dict[str, Any]) -> None:
        self.token = token
        self.payload = payload  # for the claim a client's meta may carry (hub/sessions.py)
        # PyJWT takes "exp": "1796278000" (it int()s the value); a grant that read such
        # an exp as "never" would outlive it, so RFC 7519's NumericDate is enforced.
        for claim in ("exp", "nbf"):
            if claim in payload and not _numeric_date(payload[claim]):
                raise Denied(401, f"malformed token: {claim} is not a number")
        self.exp = float(payload.get("exp") or 0.0)  # 0: never
        self.sub = payload.get("sub")
        claim = payload.get(CLAIM, {})
        subscribe = claim.get("subscribe", []) if isinstance(claim, dict) else None
        if not isinstance(subscribe, list) or not all(isinstance(s, str) for s in subscribe):
            raise Denied(401, f"malformed {CLAIM} claim: expected subscribe: [names]")
        self.claims = tuple(_pattern(s) for s in subscribe)

    def allows(self, name: str) -> bool:
        return matches(self.claims, name)


# PyJWT's exceptions, most specific first, as the fixed words a 401 says: its own
# messages are not shown, so nothing a client sent can come back in a response.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidSignatureError, "bad signature"),
)


class Verifier:
    """Checks tokens against one ``auth`` config; remembers the good ones, bounded."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        # Parsed once: PyJWT would otherwise re-read a PEM key on every decode.
        algorithm = jwt.get_algorithm_by_name(config.algorithms[0])
        self._key = algorithm.prepare_key(config.key)
        self._options: dict[str, Any] = {
            "require": ["exp"] if config.require_exp else [],
            "verify_aud": bool(config.audience),
        }
        # signature -> grant, oldest first; bounded by config.cache_size.
        self._cache: dict[str, Grant] = {}

    def verify(self, token: str) -> Grant:
        """The grant of a valid token; Denied(401) otherwise."""
        now = time.time()
        signature = token.rpartition(".")[2]
        grant = self._cache.get(signature)
        # The whole token is compared: the same signature on another header or
        # payload must not borrow a grant (it would fail verification anyway).
        if grant is not None and grant.token == token:
            if not grant.exp or now < grant.exp + self.config.leeway:
                return grant
            del self._cache[signature]
            raise Denied(401, "token expired")
        grant = Grant(token, self._decode(token))
        size = self.config.cache_size
        if size:
            if len(self._cache) >= size:
                # The oldest entry: with tokens of equal lifetimes, the next to expire.
                del self._cache[next(iter(self._cache))]
            self._cache[signature] = grant
        return grant

    def _decode(self, token: str) -> dict[str, Any]:
        c = self.config
        if not token.isascii():
            # A JWT is base64url and dots; PyJWT would fail to encode anything else
            # (bytes that are not UTF-8 arrive as lone surrogates) with a traceback.
            raise Denied(401, "malformed token")
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=list(c.algorithms),
                audience=c.audience or None,
                issuer=c.issuer or None,
                leeway=c.leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.InvalidTokenError as exc:
            if isinstance(exc, jwt.MissingRequiredClaimError):
                # The claim's name is ours (exp) or PyJWT's (aud, iss), never the client's.
                raise Denied(401, f"token lacks a required claim ({exc.claim})") from None
            for kind, reason in _REASONS:
                if isinstance(exc, kind):
                    raise Denied(401, reason) from None
            raise Denied(401, "malformed token") from None
        return payload


def token_of(request: web.Request, cookie: str) -> str | None:
    """The bearer token, from the first source present: ``Authorization: Bearer``,
    then the cookie, then the ``token`` query parameter."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, bearer = header.partition(" ")
        if scheme.lower() == "bearer" and bearer.strip():
            return bearer.strip()
    return request.cookies.get(cookie) or request.query.get(QUERY_PARAM) or None


class Access:
    """The app's gatekeeper: authorizes stream requests and ends streams whose token expires.

    Reads the live config on each request (``get_config``), so a reload that changes
    the key or a channel's ``auth`` applies to the next request; the verifier (and its
    cache) is rebuilt when the ``auth`` section changes.
    """

    def __init__(self, get_config: Callable[[], Config]) -> None:
        self._get_config = get_config
        self._verifier: Verifier | None = None
        # (when, id, subscriber): a notice is due at when < sub.expires, the end at
        # when >= sub.expires. A subscriber gone earlier stays until popped or compacted.
        self._heap: list[tuple[float, int, Subscriber]] = []
        self._stale = 0
        self._timer: asyncio.TimerHandle | None = None
        self.expired = 0  # streams ended by their token's expiry

    def verifier(self) -> Verifier | None:
        """The verifier for the current ``auth`` section, or None without one."""
        auth = self._get_config().auth
        if auth is None:
            return None
        if self._verifier is None or self._verifier.config is not auth:
            self._verifier = Verifier(auth)
        return self._verifier

    def authorize(
        self, request: web.Request, channels: Sequence[tuple[str, ChannelConfig]]
    ) -> float:
        """Check a stream request for ``channels`` (each: the concrete name asked for and
        its channel's or family's config). Returns the token's expiry (0: no token
        needed, or none set); raises Denied."""
        grant = self.grant(request, channels)
        return 0.0 if grant is None else grant.exp

    def grant(
        self, request: web.Request, channels: Sequence[tuple[str, ChannelConfig]]
    ) -> Grant | None:
        """As ``authorize``, returning the token's grant (None: no token needed)."""
        private = [name for name, cfg in channels if cfg.auth == "token"]
        if not private:
            return None
        verifier = self.verifier()
        if verifier is None:  # pragma: no cover - config validation prevents it
            raise Denied(401, "no auth configured")
        token = token_of(request, verifier.config.cookie)
        if token is None:
            raise Denied(401, "token required")
        grant = verifier.verify(token)
        denied = [name for name in private if not grant.allows(name)]
        if denied:
            raise Denied(403, f"token does not grant channel: {', '.join(denied)}")
        return grant

    # --- expiry of live streams ----------------------------------------------------

    def track(self, sub: Subscriber) -> None:
        """Watch a subscribed stream whose token expires at ``sub.expires``."""
        if sub.expires:
            notice = sub.expires - self._renew_before()
            heapq.heappush(self._heap, (notice, id(sub), sub))

    def forget(self, sub: Subscriber) -> None:
        """The stream ended: its heap entry is dropped lazily."""
        if sub.expires:
            sub.expires = 0.0
            self._stale += 1
            if self._stale > 1024 and self._stale > len(self._heap) // 2:
                # Entries of gone streams would otherwise hold them until their expiry.
                self._heap = [e for e in self._heap if e[2].expires]
                heapq.heapify(self._heap)
                self._stale = 0

    def _renew_before(self) -> float:
        auth = self._get_config().auth
        return auth.renew_before if auth is not None else 0.0

    def start(self) -> None:
        """One timer for every stream's token, not one per connection."""
        self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        # Re-armed first: whatever happens below, expiry must not stop for good.
        self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)
        now = time.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, key, sub = heapq.heappop(heap)
            if not sub.expires:  # gone already
                self._stale = max(0, self._stale - 1)
                continue
            if now < sub.expires:
                self._notify(sub)
                heapq.heappush(heap, (sub.expires, key, sub))
            else:
                sub.expires = 0.0
                self.expired += 1
                sub.end("auth_expired")

    def _notify(self, sub: Subscriber) -> None:
        data = json.dumps({"exp": int(sub.expires)}, separators=(",", ":"), allow_nan=False)
        raw = sse.encode(data, event=EXPIRED_EVENT)
        # A closed transport (its handler not yet unsubscribed) raises on uvloop.
        with contextlib.suppress(RuntimeError):
            sub.transport.write(sse.chunk(raw) if sub.chunked else raw)


def issue(
    key: Any,
    algorithm: str,
    *,
    subject: str | None,
    subscribe: Sequence[str],
    ttl: float,
    audience: str = "",
    issuer: str = "",
) -> str:
    """A signed token granting ``subscribe`` for ``ttl`` seconds (``ssehub token``)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iat": now,
        "exp": now + int(ttl),
        CLAIM: {"subscribe": list(subscribe)},
    }
    if subject:
        payload["sub"] = subject
    if audience:
        payload["aud"] = audience
    if issuer:
        payload["iss"] = issuer
    return jwt.encode(payload, key, algorithm=algorithm)
