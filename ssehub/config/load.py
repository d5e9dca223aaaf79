"""Loading: YAML in, validated frozen dataclasses out (``load``, ``parse``).

Every error names the file, the key path and the reason, e.g.
``config/x.yaml: channels.news.history: expected a positive integer, got -3``.
Unknown keys are errors: a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import yaml

from .checks import (
    CHANNEL_NAME,
    DEFAULT_GRACE,
    FAMILY_NAME,
    HMAC_ALGORITHMS,
    ConfigError,
    _describe,
    _Invalid,
    parse_address,
)
from .model import (
    AuthConfig,
    ChannelConfig,
    Config,
    Cors,
    PublishConfig,
    RedisConfig,
    Sentinel,
)
from .overlap import check_private


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


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Once per class: evaluating the annotations costs more than building an object,
    # and a config may list thousands of channels.
    return typing.get_type_hints(cls)


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            source, path or "(top level)", f"expected a mapping, got {_describe(data)}"
        )
    hints = _type_hints(cls)
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
    if ch.max_members:
        raise ConfigError(
            source, f"{path}.max_members", "only families (names with '*') have members"
        )
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
    elif isinstance(obj, PublishConfig):
        object.__setattr__(obj, "key", _publish_key(obj, path, source))
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
    if not given and auth.proxy is not None:
        return b""  # proxy only: no JWT is verified (a channel saying `token` is an error)
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


def _publish_key(publish: PublishConfig, path: str, source: str) -> bytes:
    """The key POST /publish and POST /disconnect require, from its file or variable."""
    given = [k for k in ("key_file", "key_env") if getattr(publish, k)]
    if len(given) != 1:
        return _fail(source, f"{path}.key_file", "exactly one of key_file or key_env is needed")
    where = f"{path}.{given[0]}"
    if publish.key_env:
        value = os.environ.get(publish.key_env, "")
        if not value:
            _fail(source, where, f"environment variable {publish.key_env} is not set")
        key = value.encode()
    else:
        try:
            key = Path(publish.key_file).read_bytes()
        except OSError as exc:
            _fail(source, where, f"cannot read: {exc.strerror or exc}")
    key = key.removesuffix(b"\n").removesuffix(b"\r")
    if len(key) < 16:
        _fail(source, where, f"the key must be at least 16 bytes, got {len(key)}")
    return key


def _fail(source: str, key: str, reason: str) -> typing.NoReturn:
    raise ConfigError(source, key, reason)


def _check_auth(config: Config, source: str) -> None:
    """Private channels need the auth section, and no public channel may read what one
    reads; the admin listener (every channel's presence, metrics) stays local."""
    auth = config.auth
    for ch in config.channels.values():
        where = f"channels.{ch.name}.auth"
        if ch.auth == "token" and (auth is None or not auth.key):
            _fail(source, where, "'token' needs a top-level auth section with a key")
        if ch.auth == "proxy" and (auth is None or auth.proxy is None):
            _fail(source, where, "'proxy' needs auth.proxy (the application's url)")
    names = {ch.redis_channel for ch in config.channels.values()}
    if config.control.redis_channel in names:
        _fail(
            source,
            "control.redis_channel",
            f"{config.control.redis_channel!r} is a channel's redis_channel",
        )
    check_private(config, source)
    admin = config.admin
    if admin is not None and not admin.allow_remote and not _is_loopback(admin.host):
        raise ConfigError(
            source,
            "admin.host",
            f"{admin.host!r} is not a loopback address; the admin listener serves every "
            "channel's presence and the metrics, so it stays local unless "
            "admin.allow_remote is true",
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere
