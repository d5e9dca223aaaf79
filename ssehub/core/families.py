"""Channel families: one config entry (``user.*``) serving every channel its pattern matches.

The ``*`` of a family stands for one or more letters, digits, ``_`` or ``-``; it never
matches a ``.``, so ``doc.*`` serves ``doc.9f3a`` but not ``doc.9f3a.comments`` (which
``doc.*.comments`` may serve). The same ``*`` in the family's ``redis_channel`` takes
the matched part: ``user.*`` with ``redis_channel: "app:user:*"`` feeds ``user.42``
from ``app:user:42``.

A listed channel always wins over a family. When several families match, the one with
the most literal characters wins, then the one listed first: ``room.*.chat`` beats
``room.*`` and ``*.chat`` for ``room.7.chat``.

This module only resolves names; the hub owns the members' lifetime.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from ..config import ChannelConfig

__all__ = ["MEMBER_PART", "Families", "Family"]

# What the `*` of a family matches (see the module docstring).
MEMBER_PART = re.compile(r"[A-Za-z0-9_-]+")
MAX_NAME = 200


class Family:
    """One family of the config and how its members' names map to Redis channels."""

    __slots__ = ("config", "name", "prefix", "redis_prefix", "redis_suffix", "suffix")

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config
        self.name = config.name
        self.prefix, _, self.suffix = config.name.partition("*")
        # A stream family maps members to stream keys, a pub/sub one to Redis channels.
        redis_prefix, _, redis_suffix = (config.stream or config.redis_channel).partition("*")
        self.redis_prefix = redis_prefix.encode()
        self.redis_suffix = redis_suffix.encode()

    @property
    def literal(self) -> int:
        """How many characters of the pattern are not the ``*``: the more, the more specific."""
        return len(self.prefix) + len(self.suffix)

    def part(self, name: str) -> str | None:
        """The part of ``name`` the ``*`` matches, or None when ``name`` is no member."""
        if len(name) > MAX_NAME or not (
            name.startswith(self.prefix) and name.endswith(self.suffix)
        ):
            return None
        part = name[len(self.prefix) : len(name) - len(self.suffix)]
        return part if MEMBER_PART.fullmatch(part) else None

    def redis_channel(self, part: str) -> bytes:
        """The Redis channel (or stream key) feeding the member whose ``*`` matched ``part``."""
        return self.redis_prefix + part.encode() + self.redis_suffix


class Families:
    """Every family of a config, most specific first."""

    __slots__ = ("_ordered",)

    def __init__(self, configs: Iterable[ChannelConfig]) -> None:
        families = [Family(c) for c in configs if c.family]
        # sorted() is stable: among equally specific families, config order decides.
        self._ordered = sorted(families, key=lambda f: -f.literal)

    def __iter__(self) -> Iterator[Family]:
        return iter(self._ordered)

    def __bool__(self) -> bool:
        return bool(self._ordered)

    def find(self, name: str) -> tuple[Family, str] | None:
        """The family serving ``name`` and the part its ``*`` matched, or None."""
        for family in self._ordered:
            part = family.part(name)
            if part is not None:
                return family, part
        return None
