"""No public channel can read a private one: where Redis names overlap, decided exactly.

A hub channel reads one Redis channel (or stream key); a family's member reads its
family's Redis pattern with the ``*`` replaced by the member's part, one or more of
``[A-Za-z0-9_-]`` (``core/families.py``). If a public channel or family can read a
Redis name that a private (``auth: token``) one reads, a client without a token reads
the private messages through it: ``any.*: {redis_channel: "*"}`` serves ``any.priv``
from Redis ``priv``. Such a config is an error, naming both.

Whether two such name sets meet is decided per length of the common name: at each
position each side either fixes a character (its literal prefix or suffix) or lets its
``*`` match any member character, and the positions are independent. Past the length
where the literal prefixes and suffixes no longer meet, the answer no longer changes
with the length, so only a few lengths need a look.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from .checks import ConfigError
from .model import ChannelConfig, Config

__all__ = ["Names", "check_private", "overlaps"]

# What a member's part (the ``*``) may hold, and the longest channel name.
_MEMBER_CHAR = re.compile(r"[A-Za-z0-9_-]")
MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class Names:
    """The Redis names one channel reads: ``prefix + part + suffix`` for every part of
    ``[A-Za-z0-9_-]`` between ``least`` and ``most`` characters long (0 and 0: exactly
    ``prefix``)."""

    prefix: str
    suffix: str = ""
    least: int = 0
    most: int = 0

    @classmethod
    def of(cls, pattern: str, family_name: str = "") -> Names:
        """A channel's one name, or a family's pattern (``family_name`` given: its ``*``
        takes at most what keeps the member's name within ``MAX_NAME``)."""
        if not family_name:
            return cls(pattern)
        prefix, _, suffix = pattern.partition("*")
        return cls(prefix, suffix, 1, MAX_NAME - (len(family_name) - 1))

    def at(self, i: int, length: int) -> str | None:
        """The character a name of ``length`` has at ``i``, or None where the ``*`` is."""
        if i < len(self.prefix):
            return self.prefix[i]
        if i >= length - len(self.suffix):
            return self.suffix[i - (length - len(self.suffix))]
        return None

    @property
    def literal(self) -> int:
        return len(self.prefix) + len(self.suffix)


def _fits(a: Names, b: Names, length: int) -> bool:
    for i in range(length):
        x, y = a.at(i, length), b.at(i, length)
        if x is None and y is None:
            continue
        if x is None or y is None:
            if not _MEMBER_CHAR.fullmatch(x or y or ""):
                return False
        elif x != y:
            return False
    return True


def overlaps(a: Names, b: Names) -> bool:
    """Whether some Redis name is in both sets."""
    shortest = max(a.literal + a.least, b.literal + b.least)
    longest = min(a.literal + a.most, b.literal + b.most)
    # From this length on, prefixes and suffixes no longer meet: the answer is fixed.
    settled = max(len(a.prefix), len(b.prefix)) + max(len(a.suffix), len(b.suffix))
    last = min(longest, max(shortest, settled))
    return any(_fits(a, b, n) for n in range(shortest, last + 1))


def _reads(ch: ChannelConfig) -> tuple[str, Names]:
    """What ``ch`` reads: its key (for the error) and its Redis names. Stream keys and
    pub/sub channels are apart in Redis, so the key tells them apart too."""
    field = "stream" if ch.stream else "redis_channel"
    pattern = ch.stream or ch.redis_channel
    return field, Names.of(pattern, ch.name if ch.family else "")


def _leaks(config: Config) -> Iterator[tuple[ChannelConfig, ChannelConfig, str]]:
    """Each public channel that can read what a private one reads, with that private
    channel (the first found) and the key both read by (``redis_channel``/``stream``).

    A config may list thousands of channels: one name against another is a lookup,
    and only a family (a pattern) is compared with every channel of the other side.
    """
    reads = {ch.name: _reads(ch) for ch in config.channels.values()}
    private = [ch for ch in config.channels.values() if ch.auth != "public"]
    exact: dict[tuple[str, str], ChannelConfig] = {}
    for ch in private:
        field, names = reads[ch.name]
        if not ch.family:
            exact.setdefault((field, names.prefix), ch)
    families = [ch for ch in private if ch.family]
    for public in config.channels.values():
        if public.auth != "public" or not private:
            continue
        field, names = reads[public.name]
        hit = None if public.family else exact.get((field, names.prefix))
        # A name is looked up, then met by the private families; a family meets all.
        others = [hit] if hit is not None else private if public.family else families
        for ch in others:
            other_field, other = reads[ch.name]
            if field == other_field and overlaps(names, other):
                yield public, ch, field
                break


def check_private(config: Config, source: str) -> None:
    """ConfigError when a public channel or family can read a private one's messages."""
    for public, private, field in _leaks(config):
        mine = getattr(public, field)
        theirs = getattr(private, field)
        raise ConfigError(
            source,
            f"channels.{public.name}.{field}",
            f"public {public.name!r} ({field} {mine!r}) can read what private "
            f"{private.name!r} ({field} {theirs!r}) reads: a client without a token "
            "would get its messages; give them Redis names that cannot meet",
        )
