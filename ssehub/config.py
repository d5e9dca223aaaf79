"""Typed configuration: YAML in, validated frozen dataclasses out.

Every error names the file, the key path and the reason, e.g.
``config/x.yaml: channels.news.history: expected a positive integer, got -3``.
Unknown keys are errors: a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from redis.connection import parse_url

__all__ = [
    "Admin",
    "AuthConfig",
    "ChannelConfig",
    "Config",
    "ConfigError",
    "Cors",
    "Events",
    "Juggernaut",
    "Limits",
    "Listen",
    "LoggingConfig",
    "MetaConfig",
    "PresenceConfig",
    "RedisConfig",
    "Sentinel",
    "load",
    "parse",
    "parse_address",
]

CHANNEL_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
DEFAULT_GRACE = 10.0
# A family: one `*` among channel-name characters (``user.*``, ``room.*.chat``).
FAMILY_NAME = re.compile(r"^[A-Za-z0-9._-]*\*[A-Za-z0-9._-]*$")


class ConfigError(Exception):
    """A config that cannot be used; ``str()`` is one line: ``file: key.path: reason``."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + reason)


class _Invalid(Exception):
    """Raised by validators; turned into a ConfigError with the key path."""


Check = Callable[[Any], None]


def _positive(value: Any) -> None:
    if value <= 0:
        raise _Invalid(f"expected a positive number, got {value!r}")


def _non_negative(value: Any) -> None:
    if value < 0:
        raise _Invalid(f"expected a non-negative number, got {value!r}")


def _port(value: Any) -> None:
    if not 0 <= value <= 65535:
        raise _Invalid(f"expected a port number 0-65535, got {value!r}")


def _redis_url(value: Any) -> None:
    # A cluster URL lists seed nodes: they are checked with the rest of redis:
    # (see _validate_redis).
    if value.startswith("redis+cluster://"):
        return
    # Everything the broker will take from the URL is checked here, so that a URL
    # that passes --check cannot fail at run time: redis-py's parse_url (port, db,
    # options), and the host as getaddrinfo will encode it (IDNA: "a..b" fails).
    # Reasons never echo the URL, which may hold a password.
    if not re.match(r"^(redis|rediss|unix)://", value):
        raise _Invalid("expected a redis://, rediss://, unix:// or redis+cluster:// URL")
    try:
        params: dict[str, Any] = parse_url(value)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise _Invalid(f"invalid URL: {exc}") from None
    if value.startswith("unix://"):
        where = params.get("path", "")
        if not where:
            raise _Invalid("a unix:// URL needs the socket's path (unix:///run/redis.sock)")
    else:
        where = params.get("host", "")
        try:
            where.encode("idna")
        except UnicodeError as exc:
            raise _Invalid(f"invalid host {where!r}: {exc}") from None
    if "\0" in where:
        raise _Invalid("NUL in the host or path")


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


def _one_of(*allowed: str) -> Check:
    def check(value: Any) -> None:
        if value not in allowed:
            raise _Invalid(f"expected one of {', '.join(allowed)}, got {value!r}")

    return check


def _non_negative_int(value: Any) -> None:
    if value < 0:
        raise _Invalid(f"expected a non-negative integer, got {value!r}")


def _not_empty(value: Any) -> None:
    if not value:
        raise _Invalid("must not be empty")


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_format(value: Any) -> None:
    if value not in LOG_FORMATS:
        raise _Invalid(f"expected one of {', '.join(LOG_FORMATS)}, got {value!r}")


def _log_level(value: Any) -> None:
    if value.upper() not in LOG_LEVELS:
        raise _Invalid(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")


def _check(*checks: Check) -> dict[str, Any]:
    return {"checks": checks}


def _workers(value: Any) -> int:
    """``workers:``: a positive integer, or ``auto`` for the CPUs this process may use."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(f"expected a positive integer or 'auto', got {_describe(value)}")
    return value


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata=_check(_port))


@dataclass(frozen=True, slots=True)
class Sentinel:
    """Find the master through Redis Sentinel (ssehub/sentinel.py)."""

    master: str = field(metadata=_check(_not_empty))  # the name the sentinels monitor
    nodes: tuple[str, ...] = field(metadata=_check(_not_empty))  # host:port of each sentinel

    def addresses(self) -> list[tuple[str, int]]:
        """The sentinels' (host, port), in the configured order."""
        return [parse_address(n) for n in self.nodes]


@dataclass(frozen=True, slots=True)
class RedisConfig:
    # With cluster or sentinel, host and port of this URL are ignored (cluster: a seed;
    # redis+cluster://h1:p1,h2:p2 lists several); user, password and TLS still apply.
    url: str = field(default="redis://127.0.0.1:6379/0", metadata=_check(_redis_url))
    # Redis Cluster (ssehub/cluster.py): sharded pub/sub, one connection per master;
    # stream channels: a reader per slot in use, on its master (cluster_streams.py).
    cluster: bool = False
    sentinel: Sentinel | None = None
    # Seconds without any traffic on the subscription before a PING is sent,
    # and seconds to wait for its answer before the connection is declared dead
    # (catches half-open connections that never send an RST).
    health_check_interval: float = field(default=5.0, metadata=_check(_positive))
    health_check_timeout: float = field(default=3.0, metadata=_check(_positive))
    connect_timeout: float = field(default=3.0, metadata=_check(_positive))
    # Capped exponential backoff, with full jitter, between reconnect attempts.
    reconnect_min: float = field(default=0.05, metadata=_check(_positive))
    reconnect_max: float = field(default=1.0, metadata=_check(_positive))

    def seeds(self) -> list[tuple[str, int]]:
        """The nodes named by ``url`` (several with ``redis+cluster://h1:p1,h2:p2``)."""
        rest = self.url.partition("://")[2]
        hosts = rest.partition("/")[0].rpartition("@")[2]
        return [parse_address(h if ":" in h else f"{h}:6379") for h in hosts.split(",")]


@dataclass(frozen=True, slots=True)
class Limits:
    # A subscriber whose unsent bytes exceed this is cut: a stuck client must
    # never grow the hub's memory or delay the others.
    max_buffer_bytes: int = field(default=1024 * 1024, metadata=_check(_positive))
    # Publisher payloads larger than this are rejected (logged and counted).
    max_message_bytes: int = field(default=1024 * 1024, metadata=_check(_positive))
    # Channels one /events connection may follow.
    max_channels_per_connection: int = field(default=32, metadata=_check(_positive))
    # Open streams allowed in this process, and per channel (0 = no limit). Past
    # them an EventSource gets a 200 stream that says why and when to come back.
    max_connections: int = field(default=0, metadata=_check(_non_negative_int))
    max_per_channel: int = field(default=0, metadata=_check(_non_negative_int))
    # Mean reconnection delay (ms, jittered +-50%) told to clients turned away.
    busy_retry_ms: int = field(default=5000, metadata=_check(_positive))
    # Seconds a connection may take to send a complete request (slowloris guard).
    request_timeout: float = field(default=10.0, metadata=_check(_positive))
    # Request line and header field size limits (bytes); larger gets a 4xx.
    max_line_size: int = field(default=8190, metadata=_check(_positive))
    max_field_size: int = field(default=8190, metadata=_check(_positive))
    # Family members (``user.42`` of ``user.*``) alive at once, each one Redis
    # subscription; past it a new member's browsers get the busy event.
    max_members: int = field(default=50_000, metadata=_check(_positive))
    # The most events ?rewind=N (or a channel's `rewind`) may ask for.
    max_rewind: int = field(default=100, metadata=_check(_non_negative_int))
    # Bytes of history kept by all channels together; past it the hub-wide oldest
    # events are evicted first, whatever their channel.
    history_bytes: int = field(default=256 * 1024 * 1024, metadata=_check(_positive))
    # Distinct channel sets followed through /events at once: each is a group whose
    # bytes a flush builds. A new set past the limit is turned away as busy (0 = none).
    max_event_groups: int = field(default=1000, metadata=_check(_non_negative_int))


@dataclass(frozen=True, slots=True)
class Cors:
    # Origins allowed to open streams from other sites; empty = same origin only.
    # "*" allows any origin, and only without credentials.
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    # Seconds a browser may cache a preflight answer.
    max_age: int = field(default=600, metadata=_check(_non_negative_int))


@dataclass(frozen=True, slots=True)
class Juggernaut:
    # Also accept Juggernaut's publish format on this Redis channel.
    enabled: bool = False
    redis_channel: str = field(default="juggernaut", metadata=_check(_not_empty))


@dataclass(frozen=True, slots=True)
class Events:
    """Subscribe/unsubscribe events published to Redis (see README, Juggernaut parity)."""

    enabled: bool = False
    # Where ssehub's own format goes; with juggernaut.enabled the events go to
    # Juggernaut's `<juggernaut.redis_channel>:subscribe` / `:unsubscribe` instead.
    redis_channel: str = field(default="ssehub:events", metadata=_check(_not_empty))


@dataclass(frozen=True, slots=True)
class PresenceConfig:
    """Who is subscribed to channels with ``presence: true``, kept in Redis per node."""

    # Seconds a node's entries outlive its last liveness refresh (a killed node's
    # entries vanish within this); the node refreshes every third of it.
    ttl: float = field(default=15.0, metadata=_check(_positive))
    # Also serve GET /channels/<name>/presence on the public listener (authorized as
    # a stream of the channel would be); always on the admin listener.
    public: bool = False
    # Members per page of the presence endpoint, at most.
    max_page: int = field(default=1000, metadata=_check(_positive))


@dataclass(frozen=True, slots=True)
class MetaConfig:
    """What rides along with a client's events and presence entry."""

    # Private channels: the JWT's `sub`, plus this claim when set.
    claim: str = ""
    # Public channels: the `meta` query parameter, at most this many bytes (UTF-8).
    max_bytes: int = field(default=512, metadata=_check(_positive))


@dataclass(frozen=True, slots=True)
class Admin:
    """The operators' listener (/metrics, /healthz, /readyz); keep it off the public network."""

    host: str = "127.0.0.1"
    port: int = field(default=9090, metadata=_check(_port))
    # With `auth:` configured, a non-loopback host is refused unless this says so.
    allow_remote: bool = False


# Algorithms an `auth:` section may name, by key family. "none" is never one of them.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = (
    ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),  # an RSA key
    ("ES256", "ES384", "ES512"),  # an EC key
)


def _algorithms(value: Any) -> None:
    known = (HMAC_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS)
    if not value:
        raise _Invalid("expected at least one algorithm")
    for alg in value:
        if not any(alg in family for family in known):
            names = ", ".join(a for family in known for a in family)
            raise _Invalid(f"unknown algorithm {alg!r} (known: {names})")
    if not any(set(value) <= set(family) for family in known):
        # One key verifies them all: mixing families is how algorithm confusion starts.
        raise _Invalid(f"algorithms of one key type only (HS*, RS*/PS* or ES*), got {value!r}")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """JWT verification for channels with ``auth: token`` (see README, Access control)."""

    # Accepted signature algorithms; anything else (``none`` included) is rejected.
    algorithms: tuple[str, ...] = field(default=("HS256",), metadata=_check(_algorithms))
    # HS*: the shared secret, from a file or an environment variable (never inline).
    secret_file: str = ""
    secret_env: str = ""
    # RS*/PS*/ES*: the PEM public key the tokens are verified with.
    key_file: str = ""
    # Checked when set: the token's `aud` must contain it, its `iss` must equal it.
    audience: str = ""
    issuer: str = ""
    # The cookie a browser may carry the token in (after the Authorization header,
    # before the `token` query parameter).
    cookie: str = field(default="ssehub_token", metadata=_check(_not_empty))
    # Seconds of clock skew allowed on `exp` and `nbf`.
    leeway: float = field(default=0.0, metadata=_check(_non_negative))
    # Tokens without `exp` are refused: a token in a URL must not be valid forever.
    require_exp: bool = True
    # Seconds before `exp` a stream gets the `ssehub-auth-expired` event.
    renew_before: float = field(default=30.0, metadata=_check(_positive))
    # Verified tokens remembered (by signature, until they expire) to spare a
    # signature check on every reconnect.
    cache_size: int = field(default=10000, metadata=_check(_non_negative_int))
    # The secret or PEM key read at load; never shown in a repr.
    key: bytes = field(default=b"", repr=False, metadata={"internal": True})


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    # text: one human-readable line per event; json: one JSON object per line for
    # log shippers, with the message's key=value pairs as fields.
    format: str = field(default="text", metadata=_check(_log_format))
    level: str = field(default="INFO", metadata=_check(_log_level))
    # One line per HTTP request, as its response starts (so streams are logged too).
    access_log: bool = False


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    name: str = ""
    # Redis channel feeding this hub channel; defaults to the channel's own name.
    redis_channel: str = ""
    # Publisher payload format: "text" (payload = data) or "json" (data/event/id/retry).
    format: str = field(default="text", metadata=_check(_one_of("text", "json")))
    # Events kept in memory for Last-Event-ID resume (0 = none), and their maximum
    # age in seconds (0 = no age limit).
    history: int = field(default=100, metadata=_check(_non_negative_int))
    history_ttl: float = field(default=0.0, metadata=_check(_non_negative))
    # "public": anyone may subscribe; "token": a JWT naming the channel is required.
    auth: str = field(default="public", metadata=_check(_one_of("public", "token")))
    # Families only: seconds a member stays subscribed (with its history) after its
    # last browser left, so that reconnecting browsers neither churn Redis nor lose
    # their place.
    grace: float = field(default=DEFAULT_GRACE, metadata=_check(_non_negative))
    # A Redis Stream key feeding this channel instead of pub/sub (a family's has one
    # '*'): ids are entry ids, so a client resumes exactly on any node, any time.
    stream: str = ""
    # Stream channels: trim the stream to about this many entries (XTRIM MAXLEN ~;
    # 0 = leave trimming to the publishers' XADD MAXLEN/MINID).
    stream_maxlen: int = field(default=0, metadata=_check(_non_negative_int))
    # Events a first connection (no Last-Event-ID) starts with (?rewind= overrides).
    rewind: int = field(default=0, metadata=_check(_non_negative_int))
    # With redis.cluster: publishers SPUBLISH (sharded pub/sub, read from the shard that
    # owns the channel); false for classic PUBLISH, read over one connection to any node.
    sharded: bool = True
    # Keep who is subscribed (per member for a family) in Redis, readable from any
    # node at GET /channels/<name>/presence.
    presence: bool = False

    @property
    def family(self) -> bool:
        """True for a family (``user.*``): it serves every channel its pattern matches."""
        return "*" in self.name

    # Bytes of encoded events kept (oldest evicted first), whatever ``history`` says.
    history_bytes: int = field(default=16 * 1024 * 1024, metadata=_check(_positive))


@dataclass(frozen=True, slots=True)
class Config:
    channels: Mapping[str, ChannelConfig] = field(metadata=_check(_not_empty))
    listen: Listen = field(default_factory=Listen)
    redis: RedisConfig = field(default_factory=RedisConfig)
    # Seconds between keepalive comments on every stream.
    heartbeat: float = field(default=15.0, metadata=_check(_positive))
    # Reconnection delay (ms) sent to clients in the stream's first line.
    retry_ms: int = field(default=3000, metadata=_check(_non_negative))
    limits: Limits = field(default_factory=Limits)
    # Seconds a SIGTERM/SIGINT shutdown may take before remaining streams are cut.
    shutdown_timeout: float = field(default=10.0, metadata=_check(_positive))
    cors: Cors = field(default_factory=Cors)
    juggernaut: Juggernaut = field(default_factory=Juggernaut)
    events: Events = field(default_factory=Events)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    # Off when absent: metrics are for operators and must not reach browsers.
    admin: Admin | None = None
    # JWT verification for channels with `auth: token`; off when absent.
    auth: AuthConfig | None = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # GET / serves a demo page (channels, subscribe buttons, live events); false turns it off.
    demo: bool = True
    # Worker processes sharing the public port (``auto``: one per CPU). 1 runs the
    # whole hub in one process; more run a supervisor that feeds them (workers.py).
    workers: int = field(default=1, metadata={"parse": _workers})
    source: str = field(default="<config>", metadata={"internal": True})

    def with_listen(self, host: str | None = None, port: int | None = None) -> Config:
        """Return a copy with the listener overridden (CLI ``--host``/``--port``)."""
        listen = Listen(
            host=self.listen.host if host is None else host,
            port=self.listen.port if port is None else port,
        )
        return dataclasses.replace(self, listen=listen)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(name, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, "", f"cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(name, "", f"invalid YAML{where}: {problem}") from None
    return parse(data, source=name)


def parse(data: Any, source: str = "<config>") -> Config:
    """Validate an already-parsed mapping into a Config."""
    if data is None:
        data = {}
    config: Config = _build(Config, data, "", source)
    return config


# --- the generic builder --------------------------------------------------------


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, source)
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), value, key, source)
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a mapping, got {_describe(value)}")
        _, value_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            sub = f"{key}.{k}"
            if not isinstance(k, str):
                raise ConfigError(source, sub, "keys must be strings")
            if dataclasses.is_dataclass(value_tp):
                v = {} if v is None else v
                if isinstance(v, dict) and "name" in {f.name for f in dataclasses.fields(value_tp)}:
                    if "name" in v:
                        raise ConfigError(source, f"{sub}.name", "unknown key")
                    v = {**v, "name": k}
            out[k] = _convert(value_tp, v, sub, source)
        return types.MappingProxyType(out)
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {_describe(value)}")
        (item_tp, *_) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"expected a number, got {_describe(value)}")
        return float(value)
    if tp in (int, str, bool):
        if (isinstance(value, bool) and tp is not bool) or not isinstance(value, tp):
            raise ConfigError(source, key, f"expected {_TYPE_WORDS[tp]}, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            source, path or "(top level)", f"expected a mapping, got {_describe(data)}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            known = ", ".join(sorted(fields))
            raise ConfigError(source, where, f"unknown key (known keys: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, key, "required key is missing")
            continue
        parse_value = f.metadata.get("parse")
        try:
            if parse_value is not None:
                value = parse_value(data[name])
            else:
                value = _convert(hints[name], data[name], key, source)
        except _Invalid as exc:
            raise ConfigError(source, key, str(exc)) from None
        for check in f.metadata.get("checks", ()):
            try:
                check(value)
            except _Invalid as exc:
                raise ConfigError(source, key, str(exc)) from None
        kwargs[name] = value
    if cls is Config:
        kwargs["source"] = source
    obj = cls(**kwargs)
    _validate(obj, path, source)
    return obj


def _validate_channel(ch: ChannelConfig, path: str, source: str) -> None:
    if ch.stream and ch.redis_channel:
        raise ConfigError(
            source, f"{path}.redis_channel", "a stream channel reads its stream, not pub/sub"
        )
    if ch.stream_maxlen and not ch.stream:
        raise ConfigError(source, f"{path}.stream_maxlen", "only stream channels have one")
    if ch.family and ch.stream and ch.stream.count("*") != 1:
        raise ConfigError(
            source,
            f"{path}.stream",
            f"a family's stream needs exactly one '*' for the member's part, got {ch.stream!r}",
        )
    if ch.family:
        if not FAMILY_NAME.match(ch.name) or len(ch.name) > 200:
            raise ConfigError(
                source,
                path,
                f"family {ch.name!r} must have exactly one '*' among letters, digits, "
                "'.', '_' and '-' (at most 200)",
            )
        if not ch.redis_channel and not ch.stream:
            object.__setattr__(ch, "redis_channel", ch.name)
        elif ch.redis_channel and ch.redis_channel.count("*") != 1:
            raise ConfigError(
                source,
                f"{path}.redis_channel",
                f"a family's redis_channel needs exactly one '*' for the member's part, "
                f"got {ch.redis_channel!r}",
            )
        return
    if not CHANNEL_NAME.match(ch.name):
        raise ConfigError(
            source,
            path,
            f"channel name {ch.name!r} is not URL-safe "
            "(use letters, digits, '.', '_' and '-', at most 200)",
        )
    if ch.grace != DEFAULT_GRACE:
        raise ConfigError(source, f"{path}.grace", "only families (names with '*') have a grace")
    if not ch.redis_channel and not ch.stream:
        object.__setattr__(ch, "redis_channel", ch.name)


def _validate(obj: Any, path: str, source: str) -> None:
    """Cross-field rules that a single field's check cannot express."""
    if isinstance(obj, ChannelConfig):
        _validate_channel(obj, path, source)
    elif isinstance(obj, Cors):
        if "*" in obj.allow_origins and obj.allow_credentials:
            raise ConfigError(
                source,
                f"{path}.allow_origins",
                "'*' cannot be combined with allow_credentials (browsers refuse it); "
                "list the origins",
            )
    elif isinstance(obj, AuthConfig):
        object.__setattr__(obj, "key", _auth_key(obj, path, source))
    elif isinstance(obj, Config):
        _check_auth(obj, source)
        for ch in obj.channels.values():
            if ch.rewind > obj.limits.max_rewind:
                raise ConfigError(
                    source,
                    f"channels.{ch.name}.rewind",
                    f"{ch.rewind} is more than limits.max_rewind ({obj.limits.max_rewind})",
                )
        jug = obj.juggernaut
        if obj.events.enabled:
            ours = (
                (f"{jug.redis_channel}:subscribe", f"{jug.redis_channel}:unsubscribe")
                if jug.enabled
                else (obj.events.redis_channel,)
            )
            for ch in obj.channels.values():
                if ch.redis_channel in ours:
                    raise ConfigError(
                        source,
                        f"channels.{ch.name}.redis_channel",
                        f"{ch.redis_channel!r} carries the hub's subscribe/unsubscribe events",
                    )
        if jug.enabled:
            for ch in obj.channels.values():
                if ch.redis_channel == jug.redis_channel:
                    raise ConfigError(
                        source,
                        f"channels.{ch.name}.redis_channel",
                        f"{jug.redis_channel!r} is the Juggernaut channel",
                    )
    elif isinstance(obj, RedisConfig):
        _validate_redis(obj, path, source)
    elif isinstance(obj, Sentinel):
        for i, node in enumerate(obj.nodes):
            try:
                parse_address(node)
            except ValueError as exc:
                raise ConfigError(source, f"{path}.nodes[{i}]", str(exc)) from None


def _validate_redis(obj: RedisConfig, path: str, source: str) -> None:
    if obj.reconnect_max < obj.reconnect_min:
        raise ConfigError(source, f"{path}.reconnect_max", "must not be smaller than reconnect_min")
    if obj.url.startswith("redis+cluster://"):
        object.__setattr__(obj, "cluster", True)
    if obj.cluster and obj.sentinel is not None:
        raise ConfigError(source, f"{path}.sentinel", "cannot be combined with redis.cluster")
    if (obj.cluster or obj.sentinel is not None) and obj.url.startswith("unix://"):
        raise ConfigError(
            source, f"{path}.url", "cluster and sentinel need a TCP URL (redis:// or rediss://)"
        )
    if obj.cluster:
        try:
            obj.seeds()
        except ValueError as exc:
            raise ConfigError(source, f"{path}.url", f"seed nodes: {exc}") from None


def _auth_key(auth: AuthConfig, path: str, source: str) -> bytes:
    """Read the secret or public key named by ``auth`` and check it suits its algorithms."""
    import jwt  # only hubs with an auth section need it loaded

    hmac = auth.algorithms[0] in HMAC_ALGORITHMS
    given = [k for k in ("secret_file", "secret_env", "key_file") if getattr(auth, k)]
    wanted = "secret_file or secret_env" if hmac else "key_file"
    if len(given) != 1 or (given[0] == "key_file") == hmac:
        what = "HS* algorithms" if hmac else "public-key algorithms"
        raise ConfigError(
            source,
            f"{path}.{given[0] if given else wanted}",
            f"{what} need exactly one of {wanted}",
        )
    (key_name,) = given
    where = f"{path}.{key_name}"
    if key_name == "secret_env":
        value = os.environ.get(auth.secret_env)
        if not value:
            raise ConfigError(source, where, f"environment variable {auth.secret_env} is not set")
        key = value.encode()
    else:
        try:
            key = Path(getattr(auth, key_name)).read_bytes()
        except OSError as exc:
            raise ConfigError(source, where, f"cannot read: {exc.strerror or exc}") from None
    if hmac:
        key = key.removesuffix(b"\n").removesuffix(b"\r")  # `echo secret > file`
        # RFC 7518 3.2: an HMAC key at least as long as the hash output.
        need = max(int(alg[2:]) // 8 for alg in auth.algorithms)
        if len(key) < need:
            raise ConfigError(
                source, where, f"the secret must be at least {need} bytes, got {len(key)}"
            )
    for alg in auth.algorithms:
        try:
            jwt.get_algorithm_by_name(alg).prepare_key(key)
        except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ConfigError(source, where, f"not a key for {alg}: {exc}") from None
    return key


def _check_auth(config: Config, source: str) -> None:
    """Private channels need the auth section; an auth-enabled hub keeps its admin local."""
    if config.auth is None:
        for ch in config.channels.values():
            if ch.auth == "token":
                raise ConfigError(
                    source, f"channels.{ch.name}.auth", "'token' needs a top-level auth section"
                )
        return
    admin = config.admin
    if admin is not None and not admin.allow_remote and not _is_loopback(admin.host):
        raise ConfigError(
            source,
            "admin.host",
            f"{admin.host!r} is not a loopback address; with auth configured the admin "
            "listener stays local unless admin.allow_remote is true",
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere
