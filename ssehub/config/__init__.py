"""Typed configuration: the model (``model.py``), value checks (``checks.py``) and
loading with validation (``load.py``). Callers import from here."""

from __future__ import annotations

from .checks import HMAC_ALGORITHMS, ConfigError, parse_address
from .load import load, parse
from .model import (
    Admin,
    AuthConfig,
    ChannelConfig,
    Config,
    ControlConfig,
    Cors,
    Events,
    Juggernaut,
    Limits,
    Listen,
    LoggingConfig,
    MetaConfig,
    PresenceConfig,
    ProxyAuthConfig,
    PublishConfig,
    RedisConfig,
    Sentinel,
)

__all__ = [
    "HMAC_ALGORITHMS",
    "Admin",
    "AuthConfig",
    "ChannelConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "Cors",
    "Events",
    "Juggernaut",
    "Limits",
    "Listen",
    "LoggingConfig",
    "MetaConfig",
    "PresenceConfig",
    "ProxyAuthConfig",
    "PublishConfig",
    "RedisConfig",
    "Sentinel",
    "load",
    "parse",
    "parse_address",
]
