"""Control messages and the table of refused reconnects: the pure parts of the control plane.

Every node listens to one Redis channel (``control.redis_channel``) for messages that
act on streams wherever they are:

- ``{"disconnect": {"session_id": "Xk3v_9aQ.1c"}}``, ``{"disconnect": {"user": "42"}}``
  or ``{"disconnect": {"channel": "chat"}}``, with an optional ``"reason"`` (told to the
  page in the ``ssehub-disconnect`` event), and for a user or a session
  ``"reconnect": false`` (optionally ``"refuse_seconds": N``): their reconnects are
  refused for that long. ``POST /disconnect`` takes the same body.
- ``{"refuse": {"user": "42", "until": <unix>}}`` or ``{"refuse": {"credential": <digest>,
  "until": <unix>}}``: a refusal, as the node that decided it tells the others. A
  session is refused by what it authenticated with (the digest of its token, or of the
  cookies the application was asked about), since a browser's reconnect is a new
  session with the same credential.

Refusals are kept by every node in memory (``Refusals``), so checking a connect costs
no Redis round trip; Redis keeps them too (a sorted set, scored by expiry) for nodes
that start or reconnect later.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DISCONNECT_EVENT",
    "MAX_REFUSE_SECONDS",
    "BadControl",
    "Command",
    "Disconnect",
    "Refusals",
    "Refuse",
    "credential_key",
    "encode",
    "farewell",
    "parse",
    "user_key",
]

# The named event a stream gets before a disconnect ends it.
DISCONNECT_EVENT = "ssehub-disconnect"
# A refusal lasts at most this long (30 days).
MAX_REFUSE_SECONDS = 30 * 86400.0
# What a disconnect may name: a stream, every stream of a user, every stream of a channel.
TARGETS = ("session_id", "user", "channel")
_MAX_VALUE = 256
_MAX_REASON = 200


class BadControl(ValueError):
    """A control message that cannot be used; ``str()`` names the field."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """End the streams ``target`` (session_id, user or channel) names."""

    target: str
    value: str
    reason: str = ""
    reconnect: bool = True
    # How long reconnects are refused (None: control.refuse_seconds).
    refuse_seconds: float | None = None
    # When the refusal ends (Unix time), once a node has fixed it (0: not yet).
    until: float = 0.0


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse reconnects of ``key`` (``user_key``/``credential_key``) until ``until``."""

    key: str
    until: float


Command = Disconnect | Refuse


def user_key(user: str) -> str:
    """The refusal key of a user."""
    return f"user:{user}"


def credential_key(credential: str) -> str:
    """The refusal key of a credential (a token, or the cookies asked about): a digest,
    so the credential itself is never sent, stored or logged."""
    return "credential:" + hashlib.sha256(credential.encode()).hexdigest()[:32]


def _string(obj: dict[str, Any], name: str, where: str, limit: int) -> str:
    value = obj[name]
    if not isinstance(value, str) or not value or len(value) > limit:
        raise BadControl(f"{where}.{name}: expected a string of 1-{limit} characters")
    if not value.isprintable():
        raise BadControl(f"{where}.{name}: control characters are not allowed")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadControl(f"{where}: expected a number")
    return float(value)


def _disconnect(obj: Any) -> Disconnect:
    where = "disconnect"
    if not isinstance(obj, dict):
        raise BadControl(f"{where}: expected an object")
    known = {*TARGETS, "reason", "reconnect", "refuse_seconds", "until"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise BadControl(f"{where}.{unknown[0]}: unknown field")
    targets = [t for t in TARGETS if t in obj]
    if len(targets) != 1:
        raise BadControl(f"{where}: exactly one of session_id, user or channel")
    (target,) = targets
    value = _string(obj, target, where, _MAX_VALUE)
    reason = _string(obj, "reason", where, _MAX_REASON) if obj.get("reason") else ""
    reconnect = obj.get("reconnect", True)
    if not isinstance(reconnect, bool):
        raise BadControl(f"{where}.reconnect: expected true or false")
    if not reconnect and target == "channel":
        raise BadControl(f"{where}.reconnect: false refuses a user or a session, not a channel")
    seconds = None
    if obj.get("refuse_seconds") is not None:
        seconds = _number(obj["refuse_seconds"], f"{where}.refuse_seconds")
        if not 0 < seconds <= MAX_REFUSE_SECONDS:
            raise BadControl(f"{where}.refuse_seconds: 0 < seconds <= {int(MAX_REFUSE_SECONDS)}")
    until = _number(obj["until"], f"{where}.until") if obj.get("until") is not None else 0.0
    return Disconnect(target, value, reason, reconnect, seconds, until)


def _refuse(obj: Any) -> Refuse:
    where = "refuse"
    if not isinstance(obj, dict) or set(obj) not in ({"user", "until"}, {"credential", "until"}):
        raise BadControl(f"{where}: expected {{user or credential, until}}")
    until = _number(obj["until"], f"{where}.until")
    if "user" in obj:
        return Refuse(user_key(_string(obj, "user", where, _MAX_VALUE)), until)
    digest = _string(obj, "credential", where, 64)
    return Refuse(f"credential:{digest}", until)


def parse(payload: bytes | str) -> Command:
    """A control message from Redis or ``POST /disconnect``; BadControl names what is wrong."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadControl(f"not JSON: {exc}") from None
    if not isinstance(obj, dict) or len(obj) != 1:
        raise BadControl('expected {"disconnect": {...}} or {"refuse": {...}}')
    ((kind, body),) = obj.items()
    if kind == "disconnect":
        return _disconnect(body)
    if kind == "refuse":
        return _refuse(body)
    raise BadControl(f"{kind}: unknown message (disconnect or refuse)")


def encode(command: Command) -> str:
    """The JSON a command travels in (the inverse of ``parse``)."""
    if isinstance(command, Refuse):
        kind, _, value = command.key.partition(":")
        return _dumps({"refuse": {kind: value, "until": command.until}})
    body: dict[str, Any] = {command.target: command.value}
    if command.reason:
        body["reason"] = command.reason
    if not command.reconnect:
        body["reconnect"] = False
        if command.refuse_seconds is not None:
            body["refuse_seconds"] = command.refuse_seconds
        if command.until:
            body["until"] = command.until
    return _dumps({"disconnect": body})


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def farewell(command: Disconnect) -> str:
    """The ``ssehub-disconnect`` event's data: why, and whether reconnecting is of use."""
    return _dumps({"reason": command.reason or "disconnected", "reconnect": command.reconnect})


class Refusals:
    """Refused reconnects by key (``user:<id>``, ``credential:<digest>``) -> until (Unix time).

    Checked on every connect that has a user or a credential: a dict lookup, no I/O.
    Expired entries are dropped as they are met, and all of them whenever the table
    has doubled since the last sweep, so it stays as small as what is refused now.
    """

    __slots__ = ("_swept", "_until")

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._swept = 0

    def __len__(self) -> int:
        return len(self._until)

    def add(self, key: str, until: float) -> None:
        """Refuse ``key`` until ``until`` (the later of two refusals wins)."""
        if until > self._until.get(key, 0.0):
            self._until[key] = until
        if len(self._until) > max(2 * self._swept, 64):
            now = time.time()
            self._until = {k: u for k, u in self._until.items() if u > now}
            self._swept = len(self._until)

    def until(self, *keys: str) -> float:
        """When the latest refusal of any of ``keys`` ends; 0 when none holds now."""
        now = time.time()
        latest = 0.0
        for key in keys:
            until = self._until.get(key)
            if until is None:
                continue
            if until <= now:
                del self._until[key]
            else:
                latest = max(latest, until)
        return latest

    def items(self) -> list[tuple[str, float]]:
        """Every refusal that holds now (for a worker's snapshot)."""
        now = time.time()
        return [(k, u) for k, u in self._until.items() if u > now]
