"""The typed configuration: frozen dataclasses, each field with its default and checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .checks import (
    DEFAULT_GRACE,
    _algorithms,
    _check,
    _http_url,
    _log_format,
    _log_level,
    _non_negative,
    _non_negative_int,
    _not_empty,
    _one_of,
    _port,
    _positive,
    _redis_url,
    _workers,
    parse_address,
)


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata=_check(_port))
    # Connections the kernel queues before the hub accepts them: a reconnect storm of
    # thousands queues instead of being refused. Linux caps it at net.core.somaxconn.
    backlog: int = field(default=4096, metadata=_check(_positive))


@dataclass(frozen=True, slots=True)
class Sentinel:
    """Find the master through Redis Sentinel (ssehub/redis/sentinel.py)."""

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
    # Redis Cluster (ssehub/redis/cluster.py): sharded pub/sub, one connection per master;
    # stream channels: a reader per slot in use, on its master (redis/cluster_streams.py).
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
    # Members (``user.42`` of ``user.*``) each family keeps alive at once, each one
    # Redis subscription, unless the family sets its own ``max_members``: one family
    # never spends another's. Past it a new member's browsers get the busy event.
    max_members: int = field(default=50_000, metadata=_check(_positive))
    # Members one stream may create (0 = no limit): a stream asking for more that do
    # not live yet is turned away as busy, so that no one connection spends a family.
    max_new_members_per_connection: int = field(default=8, metadata=_check(_non_negative_int))
    # The most events ?rewind=N (or a channel's `rewind`) may ask for.
    max_rewind: int = field(default=100, metadata=_check(_non_negative_int))
    # Bytes of history kept by all channels together; past it the hub-wide oldest
    # events are evicted first, whatever their channel.
    history_bytes: int = field(default=256 * 1024 * 1024, metadata=_check(_positive))
    # Distinct channel sets followed through /events at once: each is a group whose
    # bytes a flush builds. A new set past the limit is turned away as busy (0 = none).
    # Counted apart for sets of public channels only and for each private channel or
    # family (``auth: token``) a set holds: anonymous sets never spend private ones'.
    max_event_groups: int = field(default=1000, metadata=_check(_non_negative_int))
    # Open streams of one user (a token's `sub`, a proxy answer's `user`) per worker
    # process; past it the user's new streams get the busy answer (0 = no limit).
    max_per_user: int = field(default=0, metadata=_check(_non_negative_int))
    # Seconds a stream may last (0 = forever); each ends cleanly after a random 75-100%
    # of it, so that browsers reconnect (spread over the nodes, tokens checked again).
    max_stream_seconds: float = field(default=0.0, metadata=_check(_non_negative))


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
    """Subscribe/unsubscribe events published to Redis (see docs/juggernaut.md)."""

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
    # A non-loopback host is refused unless this says so: the listener serves every
    # channel's presence (private ones' too) and the metrics.
    allow_remote: bool = False


@dataclass(frozen=True, slots=True)
class ProxyAuthConfig:
    """``auth: proxy`` channels: the hub asks the application (see docs/control.md)."""

    # The application's URL the hub POSTs {"channels", "cookies"} to.
    url: str = field(metadata=_check(_http_url))
    # The cookies sent along (their names); no other cookie leaves the hub.
    cookies: tuple[str, ...] = ()
    # Seconds the application may take; slower (or down) is `ssehub-busy` auth_unavailable.
    timeout: float = field(default=3.0, metadata=_check(_positive))
    # Seconds an answer is reused for the same cookies (never past its expire_at).
    cache_seconds: float = field(default=60.0, metadata=_check(_non_negative))
    # Answers kept at most (oldest dropped first).
    cache_size: int = field(default=10000, metadata=_check(_non_negative_int))


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """JWT verification for channels with ``auth: token`` (see docs/access-control.md)."""

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
    # `auth: proxy` channels: ask the application at this URL (JWT keys not needed then).
    proxy: ProxyAuthConfig | None = None
    # The secret or PEM key read at load (b"" without one: proxy only); never in a repr.
    key: bytes = field(default=b"", repr=False, metadata={"internal": True})


@dataclass(frozen=True, slots=True)
class PublishConfig:
    """``POST /publish`` and ``POST /disconnect`` (see docs/control.md)."""

    # The key clients send as `Authorization: Bearer <key>`: from a file or an
    # environment variable, never inline. Without one there is no endpoint.
    key_file: str = ""
    key_env: str = ""
    # Also serve POST /publish on the public listener (always on the admin one).
    public: bool = False
    # The largest request body, and the most messages one request may carry.
    max_body_bytes: int = field(default=1024 * 1024, metadata=_check(_positive))
    max_batch: int = field(default=100, metadata=_check(_positive))
    # Seconds an Idempotency-Key is remembered (in Redis, so every node sees it).
    idempotency_seconds: float = field(default=300.0, metadata=_check(_positive))
    # The key read at load; never shown in a repr.
    key: bytes = field(default=b"", repr=False, metadata={"internal": True})


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Disconnects and refused reconnects, told to every node over Redis."""

    # The Redis channel every node listens to for control messages (classic pub/sub,
    # also with Redis Cluster); refusals are kept in the sorted set `<it>:refusals`.
    redis_channel: str = field(default="ssehub:control", metadata=_check(_not_empty))
    # Seconds a `"reconnect": false` disconnect refuses reconnects, unless it says.
    refuse_seconds: float = field(default=3600.0, metadata=_check(_positive))


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
    # "proxy": the application is asked (auth.proxy).
    auth: str = field(default="public", metadata=_check(_one_of("public", "token", "proxy")))
    # Families only: seconds a member stays subscribed (with its history) after its
    # last browser left, so that reconnecting browsers neither churn Redis nor lose
    # their place.
    grace: float = field(default=DEFAULT_GRACE, metadata=_check(_non_negative))
    # Families only: members alive at once (0: ``limits.max_members``).
    max_members: int = field(default=0, metadata=_check(_non_negative_int))
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
    # POST /publish and POST /disconnect; off without a key.
    publish: PublishConfig | None = None
    control: ControlConfig = field(default_factory=ControlConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # GET / serves a demo page (channels, subscribe buttons, live events); false turns it off.
    demo: bool = True
    # Worker processes sharing the public port (``auto``: one per CPU). 1 runs the
    # whole hub in one process; more run a supervisor that feeds them (supervisors/multiprocess.py).
    workers: int = field(default=1, metadata={"parse": _workers})
    source: str = field(default="<config>", metadata={"internal": True})

    def counts(self) -> dict[str, int]:
        """The listed channels and the families (``user.*``), as ``--check`` says them
        and the hub logs them: a family is not a channel until a member is asked for."""
        families = sum(ch.family for ch in self.channels.values())
        return {"channels": len(self.channels) - families, "families": families}

    def with_listen(self, host: str | None = None, port: int | None = None) -> Config:
        """Return a copy with the listener overridden (CLI ``--host``/``--port``)."""
        listen = dataclasses.replace(
            self.listen,
            host=self.listen.host if host is None else host,
            port=self.listen.port if port is None else port,
        )
        return dataclasses.replace(self, listen=listen)
