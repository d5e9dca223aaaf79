"""No config lets a public channel read a private one's Redis channel or stream
(``ssehub/config/overlap.py``): the overlap of Redis names, decided exactly."""

from __future__ import annotations

import itertools
import random
import re
import time
from pathlib import Path

import pytest

from ssehub.config import ConfigError, load
from ssehub.config.overlap import MAX_NAME, Names, overlaps
from ssehub.server import HubServer

from .redis_server import RedisServer
from .sseclient import http_request, wait_until
from .test_config import run_cli, write

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def names(pattern: str) -> Names:
    """A channel's name, or (with a '*') a family's pattern, its family name short."""
    return Names.of(pattern, "f.*" if "*" in pattern else "")


@pytest.mark.parametrize(
    ("a", "b", "meet"),
    [
        # One name and a pattern: the '*' takes one or more of [A-Za-z0-9_-].
        ("priv", "*", True),
        ("app:user:42", "app:user:*", True),
        ("app:user:", "app:user:*", False),  # the '*' is never empty
        ("app:user:4.2", "app:user:*", False),  # nor holds a dot
        ("app:user:a b", "app:user:*", False),
        ("app:user:a:b", "app:user:*", False),
        ("pxs", "p*s", True),
        ("ps", "p*s", False),
        ("p:s", "p*s", False),
        ("x", "y", False),
        ("same", "same", True),
        # Two patterns.
        ("app:user:*", "app:user:*", True),
        ("*", "*", True),
        ("app:*", "app:user:*", False),  # app:user:x would need ':' in the first '*'
        ("app-*", "app-user-*", True),  # app-user-x
        ("app.*", "app.user.*", False),
        ("*:chat", "room:*", True),  # room:chat
        ("a*", "*b", True),  # ab
        ("a*", "*a", True),  # aa
        ("aa*", "*aa", True),  # aaa: prefix and suffix share a character
        ("ab*", "*ba", True),  # aba
        ("ab*", "b*", False),
        ("*ab", "*b", True),
        ("*ab", "*a", False),
        ("ab*", "*:", False),  # ab* never ends with ':'
        ("a:*", "*:b", True),  # a:b
        ("x*y", "x*", True),
        ("x*y", "*z", False),
        ("q:*:r", "q:*", False),
        ("q:*:r", "*:r", False),
        ("q-*-r", "*-r", True),
    ],
)
def test_overlap_table(a: str, b: str, meet: bool) -> None:
    assert overlaps(names(a), names(b)) is meet
    assert overlaps(names(b), names(a)) is meet


def test_a_member_name_stays_within_the_longest_channel_name() -> None:
    # A family named with 199 literal characters: its '*' takes one character.
    family = "f" * 198 + ".*"
    short = Names.of("a*", family)
    assert overlaps(short, Names.of("ab"))
    assert not overlaps(short, Names.of("abc"))
    assert Names.of("a*", "f.*").most == MAX_NAME - 2


def _member(pattern: str) -> re.Pattern[str]:
    prefix, star, suffix = pattern.partition("*")
    middle = "[A-Za-z0-9_-]+" if star else ""
    return re.compile(re.escape(prefix) + middle + re.escape(suffix))


def _brute(a: str, b: str) -> bool:
    """Some name of ``a`` (its '*' as every short string of a few characters) is b's."""
    if "*" not in a:
        return bool(_member(b).fullmatch(a))
    prefix, _, suffix = a.partition("*")
    other = _member(b)
    for n in range(1, 7):
        for part in itertools.product("abz-", repeat=n):
            if other.fullmatch(prefix + "".join(part) + suffix):
                return True
    return False


def test_overlap_agrees_with_brute_force_on_random_patterns() -> None:
    rng = random.Random(20)

    def pattern() -> str:
        text = "".join(rng.choice("ab:.") for _ in range(rng.randint(0, 4)))
        if rng.random() < 0.8:
            at = rng.randint(0, len(text))
            text = text[:at] + "*" + text[at:]
        return text or "a"

    for _ in range(300):
        a, b = pattern(), pattern()
        assert overlaps(names(a), names(b)) is _brute(a, b), (a, b)


# --- the config ---------------------------------------------------------------------


def leak_error(tmp_path: Path, channels: str, extra: str = "") -> str:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    path = write(tmp_path, f"auth: {{secret_file: '{secret}'}}\n{extra}channels:\n{channels}")
    with pytest.raises(ConfigError) as info:
        load(path)
    return str(info.value).partition(": ")[2]


def test_a_public_family_reading_every_channel_is_refused(tmp_path: Path) -> None:
    msg = leak_error(tmp_path, "  any.*: {redis_channel: '*'}\n  priv: {auth: token}\n")
    assert msg.startswith("channels.any.*.redis_channel: public 'any.*'")
    assert "'*'" in msg and "private 'priv'" in msg and "'priv'" in msg


def test_a_public_family_on_a_private_familys_pattern_is_refused(tmp_path: Path) -> None:
    channels = (
        "  u.*: {redis_channel: 'app:user:*'}\n"
        "  user.*: {redis_channel: 'app:user:*', auth: token}\n"
    )
    msg = leak_error(tmp_path, channels)
    assert msg.startswith("channels.u.*.redis_channel: public 'u.*'")
    assert "private 'user.*'" in msg


def test_a_public_channel_on_a_private_members_redis_channel_is_refused(tmp_path: Path) -> None:
    private = "  user.*: {redis_channel: 'app:user:*', auth: token}\n"
    channels = "  peek: {redis_channel: 'app:user:42'}\n" + private
    assert "public 'peek'" in leak_error(tmp_path, channels)
    channels = "  peek: {}\n  other: {redis_channel: peek, auth: token}\n"
    assert "private 'other'" in leak_error(tmp_path, channels)


def test_stream_keys_are_checked_apart_from_pubsub_channels(tmp_path: Path) -> None:
    channels = "  s.*: {stream: 'ev:*'}\n  p: {stream: 'ev:p', auth: token}\n"
    msg = leak_error(tmp_path, channels)
    assert msg.startswith("channels.s.*.stream: public 's.*' (stream 'ev:*')")
    # A stream key and a pub/sub channel of the same name are different things in Redis.
    secret = tmp_path / "secret"
    ok = write(
        tmp_path,
        f"auth: {{secret_file: '{secret}'}}\nchannels:\n"
        "  feed: {redis_channel: x}\n  priv: {stream: x, auth: token}\n"
        "  pub.*: {redis_channel: 'app:pub:*'}\n"
        "  user.*: {redis_channel: 'app:user:*', auth: token}\n",
    )
    assert set(load(ok).channels) == {"feed", "priv", "pub.*", "user.*"}


def test_check_refuses_a_leaking_config_with_exit_2_naming_both(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    path = write(
        tmp_path,
        f"auth: {{secret_file: '{secret}'}}\n"
        "channels:\n  any.*: {redis_channel: '*'}\n  priv: {auth: token}\n",
    )
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 2
    assert "public 'any.*'" in result.stderr and "private 'priv'" in result.stderr


async def test_a_reload_to_a_leaking_config_is_rejected(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    head = (
        f"listen: {{host: 127.0.0.1, port: 0}}\nredis: {{url: '{redis_server.url}'}}\n"
        f"shutdown_timeout: 2\nauth: {{secret_file: '{secret}'}}\nchannels:\n"
    )
    path = tmp_path / "hub.yaml"
    path.write_text(head + "  any.*: {redis_channel: 'pub:*'}\n  priv: {auth: token}\n")
    server = HubServer(load(path))
    await server.start()
    try:
        await wait_until(lambda: server.broker.ready)
        path.write_text(head + "  any.*: {redis_channel: '*'}\n  priv: {auth: token}\n")
        assert not server.reload()
        assert server.config.channels["any.*"].redis_channel == "pub:*"
        status, _, _ = await http_request(server.port, "/channels/priv")
        assert status == 401
    finally:
        await server.stop()


def test_the_admin_listener_stays_on_loopback_unless_allowed(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        load(write(tmp_path, f"channels: {{chat: {{}}}}\nadmin: {{host: '{host}'}}\n"))
    # With or without auth: the admin listener serves every channel's presence.
    path = write(tmp_path, "channels: {chat: {}}\nadmin: {host: 0.0.0.0}\n")
    with pytest.raises(ConfigError, match=r"admin\.host: '0\.0\.0\.0' is not a loopback"):
        load(path)
    load(write(tmp_path, "channels: {chat: {}}\nadmin: {host: 0.0.0.0, allow_remote: true}\n"))


def test_thousands_of_channels_are_checked_by_lookup_not_pairs(tmp_path: Path) -> None:
    lines = [f"  p{i}: {{}}\n  s{i}: {{auth: token}}\n" for i in range(3000)]
    started = time.monotonic()
    msg = leak_error(tmp_path, "".join(lines) + "  x: {redis_channel: s17}\n")
    assert msg.startswith("channels.x.redis_channel: public 'x'") and "private 's17'" in msg
    assert time.monotonic() - started < 5  # 9 million pairs would take minutes
