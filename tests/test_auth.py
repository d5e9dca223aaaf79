"""Access control: tokens from each source, every way a token is refused, claims and
patterns, expiry of live streams, and the query token kept out of every log line."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ssehub.config import AuthConfig, ConfigError
from ssehub.http.auth import CLAIM, EXPIRED_EVENT, Access, Denied, Grant, Verifier, matches
from ssehub.server import HubServer

from .conftest import StartHub, hub_config
from .logcheck import records_with, rendered
from .sseclient import SSEClient, http_request, open_stream, wait_until

SECRET = b"a-test-secret-that-is-long-enough-for-hs256"
CHANNELS = {"chat": {}, "user.42": {"auth": "token"}, "news.sport": {"auth": "token"}}


def token(key: bytes | Any = SECRET, alg: str = "HS256", ttl: float = 60, **claims: Any) -> str:
    now = time.time()
    payload: dict[str, Any] = {"exp": int(now + ttl), CLAIM: {"subscribe": ["user.42"]}}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg)


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")  # as `echo … > file` writes it
    return str(path)


def pem_pair(tmp_path: Path, kind: str) -> tuple[Any, str, bytes]:
    """A private key, the path of its public PEM, and the public PEM bytes."""
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / f"{kind}.pub.pem"
    path.write_bytes(public)
    return private, str(path), public


async def status_of(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    return (await http_request(port, path, headers=headers))[0]


# --- sources ------------------------------------------------------------------------


async def test_valid_token_from_each_source_opens_the_private_stream(
    start_hub: StartHub, secret_file: str, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(CHANNELS, auth={"secret_file": secret_file, "cookie": "hubtok"})
    t = token()
    clients = [
        await open_stream(hub.port, "/channels/user.42", headers={"Authorization": f"Bearer {t}"}),
        await open_stream(hub.port, "/channels/user.42", headers={"Cookie": f"hubtok={t}"}),
        await open_stream(hub.port, f"/channels/user.42?token={t}"),
    ]
    try:
        await redis_client.publish("user.42", "for 42 only")
        for c in clients:
            events = await c.next_events(1)
            assert [e.data for e in events] == ["for 42 only"]
    finally:
        for c in clients:
            await c.close()


async def test_sources_are_taken_in_order_header_then_cookie_then_query(
    start_hub: StartHub, secret_file: str
) -> None:
    hub = await start_hub(CHANNELS, auth={"secret_file": secret_file})
    good, bad = token(), token(key=b"x" * 40)
    path = f"/channels/user.42?token={good}"
    # The first source present is the one used: a bad header is not rescued by the query.
    assert await status_of(hub.port, path, {"Authorization": f"Bearer {bad}"}) == 401
    assert await status_of(hub.port, path, {"Cookie": f"ssehub_token={bad}"}) == 401
    ok = {"Authorization": f"Bearer {good}", "Cookie": f"ssehub_token={bad}"}
    c = await open_stream(hub.port, f"/channels/user.42?token={bad}", headers=ok)
    await c.close()


async def test_public_channels_need_and_check_no_token(
    start_hub: StartHub, secret_file: str
) -> None:
    hub = await start_hub(CHANNELS, auth={"secret_file": secret_file})
    c = await open_stream(hub.port, "/channels/chat?token=garbage")
    await c.close()


# --- refusals -----------------------------------------------------------------------


async def test_every_bad_token_is_a_401_naming_why(start_hub: StartHub, secret_file: str) -> None:
    hub = await start_hub(
        CHANNELS, auth={"secret_file": secret_file, "audience": "hub", "issuer": "app"}
    )
    ok = {"aud": "hub", "iss": "app"}
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = jwt.encode({**ok, "exp": int(time.time() + 60)}, SECRET).split(".")[1]
    cases = {
        "": "token required",
        token(ttl=-10, **ok): "token expired",
        token(nbf=int(time.time() + 60), **ok): "token not yet valid",
        token(key=b"y" * 40, **ok): "bad signature",
        f"{header}.{body}.": "algorithm not allowed",
        token(key=SECRET * 2, alg="HS512", **ok): "algorithm not allowed",
        token(aud="elsewhere", iss="app"): "wrong audience",
        token(aud="hub", iss="someone"): "wrong issuer",
        token(ttl=0, exp=None, **ok): "token lacks a required claim (exp)",
        token(iss="app"): "token lacks a required claim (aud)",
        token(aud="hub"): "token lacks a required claim (iss)",
        token(exp=str(int(time.time() + 60)), **ok): "malformed token: exp is not a number",
        token(nbf=str(int(time.time() - 60)), **ok): "malformed token: nbf is not a number",
        token(exp=int(time.time() + 60) + 0.5, nbf=True, **ok): "malformed token: nbf",
        "not.a.jwt": "malformed token",
        token(ssehub={"subscribe": "user.42"}, **ok): "malformed ssehub claim",
    }
    for t, reason in cases.items():
        status, headers, text = await http_request(hub.port, f"/channels/user.42?token={t}")
        assert status == 401, (t, text)
        assert text.decode().startswith(reason), (t, text)
        assert headers["www-authenticate"].startswith('Bearer realm="ssehub"')
    c = await open_stream(hub.port, f"/channels/user.42?token={token(**ok)}")
    await c.close()


@pytest.mark.parametrize(
    "header",
    [
        b"Authorization: Bearer \xff\xfe\x80",
        b"Authorization: Bearer eyJ\xc3",
        b"Cookie: ssehub_token=\xff\xfe",
    ],
)
async def test_a_token_that_is_not_utf8_is_a_401_without_a_traceback(
    start_hub: StartHub, secret_file: str, caplog: pytest.LogCaptureFixture, header: bytes
) -> None:
    hub = await start_hub(CHANNELS, auth={"secret_file": secret_file})
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        writer.write(b"GET /channels/user.42 HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % header)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert head.split()[1] == b"401", head
    assert body.endswith(b"malformed token\n")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert await status_of(hub.port, "/channels/user.42?token=%ff%fe") == 401


def test_a_grant_honours_only_numeric_dates() -> None:
    claims = {CLAIM: {"subscribe": ["user.42"]}}
    assert Grant("t", {**claims, "exp": 1796278000}).exp == 1796278000.0
    assert Grant("t", {**claims, "exp": 1796278000.5}).exp == 1796278000.5
    assert Grant("t", claims).exp == 0.0  # no exp (auth.require_exp: false): never
    for bad in ("1796278000", True, None, [1], float("nan"), float("inf")):
        with pytest.raises(Denied, match="exp is not a number"):
            Grant("t", {**claims, "exp": bad})
        with pytest.raises(Denied, match="nbf is not a number"):
            Grant("t", {**claims, "exp": 1796278000, "nbf": bad})


async def test_hs_rs_confusion_is_rejected(start_hub: StartHub, tmp_path: Path) -> None:
    private, pub_path, public_pem = pem_pair(tmp_path, "rsa")
    hub = await start_hub(CHANNELS, auth={"algorithms": ["RS256"], "key_file": pub_path})
    good = token(key=private, alg="RS256")
    c = await open_stream(hub.port, f"/channels/user.42?token={good}")
    await c.close()
    # The classic attack: HS256 with the (public) RSA key as the HMAC secret.
    # PyJWT refuses to make one, so it is built by hand.
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + good.split(".")[1]
    mac = hmac.new(public_pem, signing.encode(), hashlib.sha256).digest()
    forged = f"{signing}.{b64(mac)}"
    status, _, text = await http_request(hub.port, f"/channels/user.42?token={forged}")
    assert (status, text) == (401, b"algorithm not allowed\n")


async def test_es256_tokens(start_hub: StartHub, tmp_path: Path) -> None:
    private, pub_path, _ = pem_pair(tmp_path, "ec")
    hub = await start_hub(CHANNELS, auth={"algorithms": ["ES256"], "key_file": pub_path})
    c = await open_stream(hub.port, f"/channels/user.42?token={token(private, 'ES256')}")
    await c.close()
    other, _, _ = pem_pair(tmp_path / "..", "ec")
    assert await status_of(hub.port, f"/channels/user.42?token={token(other, 'ES256')}") == 401


async def test_channel_not_in_the_claim_is_a_403(start_hub: StartHub, secret_file: str) -> None:
    hub = await start_hub(CHANNELS, auth={"secret_file": secret_file})
    t = token()  # grants user.42 only
    status, _, text = await http_request(hub.port, f"/channels/news.sport?token={t}")
    assert (status, text) == (403, b"token does not grant channel: news.sport\n")
    empty = token(ssehub=None)  # no claim at all: valid, grants nothing private
    assert await status_of(hub.port, f"/channels/user.42?token={empty}") == 403


async def test_pattern_claims(start_hub: StartHub, secret_file: str) -> None:
    hub = await start_hub(CHANNELS, auth={"secret_file": secret_file})
    t = token(ssehub={"subscribe": ["news.*"]})
    c = await open_stream(hub.port, f"/channels/news.sport?token={t}")
    await c.close()
    assert await status_of(hub.port, f"/channels/user.42?token={t}") == 403


def test_claim_patterns_match_concrete_names_only_as_written() -> None:
    grant = Grant("t", {CLAIM: {"subscribe": ["user.42", "news.*", "a*b", "*.log"]}})
    assert grant.allows("user.42")
    assert not grant.allows("user.421") and not grant.allows("user.4")
    assert grant.allows("news.sport") and grant.allows("news.sport.uk") and grant.allows("news.")
    assert not grant.allows("news") and not grant.allows("newsx")
    assert grant.allows("ab") and grant.allows("a.x.b") and not grant.allows("a.x.bc")
    assert grant.allows("x.log") and not grant.allows("x.logs")
    # Regex characters in a claim are literal: "." is a dot, not any character.
    assert not matches(Grant("t", {CLAIM: {"subscribe": ["user.4?"]}}).claims, "userx4?")
    assert Grant("t", {CLAIM: {"subscribe": ["*"]}}).allows("anything")
    # The check takes the concrete name: a channel need not be listed (families).
    assert Grant("t", {CLAIM: {"subscribe": ["user.*"]}}).allows("user.7")


async def test_events_needs_every_private_channel_granted(
    start_hub: StartHub, secret_file: str, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(CHANNELS, auth={"secret_file": secret_file})
    t = token()  # user.42, not news.sport
    both = "/events?channel=chat&channel=user.42&channel=news.sport"
    status, _, text = await http_request(hub.port, f"{both}&token={t}")
    assert (status, text) == (403, b"token does not grant channel: news.sport\n")
    assert await status_of(hub.port, "/events?channel=chat&channel=user.42") == 401
    c = await open_stream(hub.port, f"/events?channel=chat&channel=user.42&token={t}")
    try:
        await redis_client.publish("user.42", "private")
        (event,) = await c.next_events(1)
        assert (event.event, event.data) == ("user.42", "private")
    finally:
        await c.close()


async def test_any_node_accepts_any_valid_token(start_hub: StartHub, secret_file: str) -> None:
    a = await start_hub(CHANNELS, auth={"secret_file": secret_file})
    b = await start_hub(CHANNELS, auth={"secret_file": secret_file})
    t = token()
    for hub in (a, b):
        c = await open_stream(hub.port, f"/channels/user.42?token={t}")
        await c.close()


# --- expiry -------------------------------------------------------------------------


async def test_token_expiry_warns_then_ends_the_live_stream_cleanly(
    start_hub: StartHub, secret_file: str, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(CHANNELS, auth={"secret_file": secret_file, "renew_before": 1})
    exp = int(time.time()) + 3
    c = await open_stream(hub.port, f"/channels/user.42?token={token(exp=exp)}")
    public = await open_stream(hub.port, "/channels/chat")
    try:
        await redis_client.publish("user.42", "before")
        await c.read_until(lambda c: any(e.event == EXPIRED_EVENT for e in c.events), 6)
        assert time.time() < exp
        kinds = [e.event for e in c.events]
        assert kinds == ["message", EXPIRED_EVENT]
        assert json.loads(c.events[-1].data) == {"exp": exp}
        assert c.events[-1].id == c.events[0].id  # the notice moves no position
        await c.read_to_eof(timeout=4)
        assert c.ended_cleanly and time.time() >= exp
        assert hub.hub.stats.closed["auth_expired"] == 1
        # A public stream on the same hub is untouched.
        await redis_client.publish("chat", "still here")
        (event,) = await public.next_events(1)
        assert event.data == "still here"
    finally:
        await c.close()
        await public.close()


async def test_a_reconnect_after_expiry_meets_a_401(start_hub: StartHub, secret_file: str) -> None:
    hub = await start_hub(CHANNELS, auth={"secret_file": secret_file})
    exp = int(time.time()) + 2
    t = token(exp=exp)
    c = await open_stream(hub.port, f"/channels/user.42?token={t}")  # verified and cached
    await c.close()
    await wait_until(lambda: time.time() >= exp, timeout=3)
    assert await status_of(hub.port, f"/channels/user.42?token={t}") == 401


def test_expiry_heap_drops_gone_streams() -> None:
    access = Access(lambda: hub_config("redis://127.0.0.1:1/0"))

    class Sub:
        expires = 0.0

    subs: list[Any] = [Sub() for _ in range(3000)]
    for sub in subs:
        sub.expires = time.time() + 3600
        access.track(sub)
    for sub in subs[:2000]:
        access.forget(sub)
    # Compacted: gone streams are not held until their tokens expire.
    assert len(access._heap) < 3000


# --- cache --------------------------------------------------------------------------


def auth_config(secret_file: str, **kw: Any) -> AuthConfig:
    config = hub_config("redis://127.0.0.1:1/0", CHANNELS, auth={"secret_file": secret_file, **kw})
    assert config.auth is not None
    return config.auth


def test_verified_tokens_are_cached_by_signature_bounded(
    secret_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = Verifier(auth_config(secret_file, cache_size=2))
    calls = []
    decode = verifier._decode
    monkeypatch.setattr(verifier, "_decode", lambda t: calls.append(t) or decode(t))
    t1, t2, t3 = (token(sub=str(i)) for i in range(3))
    for _ in range(3):
        verifier.verify(t1)
    assert calls == [t1]
    verifier.verify(t2)
    verifier.verify(t3)  # evicts t1, the oldest
    verifier.verify(t1)
    assert calls == [t1, t2, t3, t1]
    assert len(verifier._cache) == 2
    # The same signature on another payload does not borrow the cached grant.
    head, _, sig = t1.split(".")
    forged = f"{head}.{t2.split('.')[1]}.{sig}"
    with pytest.raises(Exception, match="bad signature"):
        verifier.verify(forged)


# --- logs and admin -----------------------------------------------------------------


async def test_query_token_is_absent_from_every_log_line(
    start_hub: StartHub, secret_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hub = await start_hub(CHANNELS, auth={"secret_file": secret_file}, logging={"access_log": True})
    t = token()
    bad = token(key=b"z" * 40)
    for path in (
        f"/channels/user.42?token={t}",  # 200 stream
        f"/channels/news.sport?token={t}",  # 403
        f"/channels/user.42?token={bad}",  # 401
        f"/channels/nope?a=1&%74oken={t}",  # 404, the name percent-encoded
        f"/events?channel=user.42&token={t}&channel=chat",
    ):
        c = await SSEClient.connect(hub.port, path)
        await c.close()
    # A request aiohttp cannot parse: its error message quotes the request line.
    c = await SSEClient.connect(hub.port, f"/channels/user.42?token={t}\x01")
    assert c.status == 400
    await c.close()
    await wait_until(lambda: len(records_with(caplog, "request")) >= 5)
    lines = rendered(caplog).splitlines()
    assert any("token=REDACTED" in line for line in lines)
    assert any("bad request" in line and "reason=" in line for line in lines)
    for secret in (t, bad, t.split(".")[2], bad.split(".")[2]):
        assert not [line for line in lines if secret in line]


async def test_admin_endpoints_are_not_reachable_on_the_public_port(
    start_hub: StartHub, secret_file: str
) -> None:
    hub = await start_hub(
        CHANNELS, auth={"secret_file": secret_file}, admin={"host": "127.0.0.1", "port": 0}
    )
    assert await status_of(hub.admin_port, "/metrics") == 200
    for path in ("/metrics", "/stats", "/admin", "/debug"):
        assert await status_of(hub.port, path) == 404


def test_auth_keeps_the_admin_listener_on_loopback(secret_file: str) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        hub_config("redis://x:1", CHANNELS, auth={"secret_file": secret_file}, admin={"host": host})
    with pytest.raises(ConfigError, match=r"admin\.host: '0\.0\.0\.0' is not a loopback"):
        hub_config(
            "redis://x:1", CHANNELS, auth={"secret_file": secret_file}, admin={"host": "0.0.0.0"}
        )
    hub_config(
        "redis://x:1",
        CHANNELS,
        auth={"secret_file": secret_file},
        admin={"host": "0.0.0.0", "allow_remote": True},
    )
    # Without auth too (issue 20): see tests/test_overlap.py.
    with pytest.raises(ConfigError, match=r"admin\.host: '0\.0\.0\.0' is not a loopback"):
        hub_config("redis://x:1", admin={"host": "0.0.0.0"})


def test_hub_without_auth_section_serves_as_before() -> None:
    server = HubServer(hub_config("redis://127.0.0.1:1/0"))
    assert server.config.auth is None


# --- config -------------------------------------------------------------------------


def test_auth_config_errors_name_the_key(
    tmp_path: Path, secret_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, pub_path, _ = pem_pair(tmp_path, "rsa")
    short = tmp_path / "short"
    short.write_bytes(b"tooshort")
    monkeypatch.delenv("SSEHUB_TEST_SECRET", raising=False)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"secret_file": str(tmp_path / "nope")}, r"auth\.secret_file: cannot read: No such file"),
        (
            {"secret_env": "SSEHUB_TEST_SECRET"},
            r"auth\.secret_env: environment variable SSEHUB_TEST_SECRET is not set",
        ),
        (
            {"algorithms": ["none"], "secret_file": secret_file},
            r"auth\.algorithms: unknown algorithm 'none'",
        ),
        (
            {"algorithms": ["HS256", "RS256"], "key_file": pub_path},
            r"auth\.algorithms: algorithms of one key type only",
        ),
        (
            {"secret_file": str(short)},
            r"auth\.secret_file: the secret must be at least 32 bytes, got 8",
        ),
        ({"secret_file": pub_path}, r"auth\.secret_file: not a key for HS256"),
        (
            {"algorithms": ["RS256"], "key_file": secret_file},
            r"auth\.key_file: not a key for RS256",
        ),
        (
            {"algorithms": ["RS256"], "secret_file": secret_file},
            r"auth\.secret_file: public-key algorithms need exactly one of key_file",
        ),
        ({}, r"auth\.secret_file or secret_env: HS\* algorithms need exactly one"),
        ({"secret": "inline"}, r"auth\.secret: unknown key"),
    ]
    for auth, message in cases:
        with pytest.raises(ConfigError, match=message):
            hub_config("redis://x:1", CHANNELS, auth=auth)
    with pytest.raises(
        ConfigError, match=r"channels\.user\.42\.auth: 'token' needs a top-level auth"
    ):
        hub_config("redis://x:1", CHANNELS)
    with pytest.raises(ConfigError, match=r"channels\.chat\.auth: expected one of"):
        hub_config("redis://x:1", {"chat": {"auth": "private"}})
    monkeypatch.setenv("SSEHUB_TEST_SECRET", SECRET.decode())
    config = hub_config("redis://x:1", CHANNELS, auth={"secret_env": "SSEHUB_TEST_SECRET"})
    assert config.auth is not None and config.auth.key == SECRET
    assert SECRET.decode() not in repr(config)


def test_bad_auth_config_exits_2(tmp_path: Path) -> None:
    from ssehub.cli.main import EXIT_CONFIG, main

    path = tmp_path / "hub.yaml"
    path.write_text("auth: {secret_file: /nonexistent/secret}\nchannels: {chat: {}}\n")
    assert main(["--config", str(path), "--check"]) == EXIT_CONFIG


async def test_private_family_serves_each_bearer_its_own_member_only(
    start_hub: StartHub, secret_file: str, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(
        {"chat": {}, "user.*": {"auth": "token"}}, auth={"secret_file": secret_file}
    )
    t = token()  # user.42
    status, _, text = await http_request(hub.port, f"/channels/user.43?token={t}")
    assert (status, text) == (403, b"token does not grant channel: user.43\n")
    assert await status_of(hub.port, "/channels/user.43") == 401
    # Refused before the member exists: no Redis subscription for a stranger.
    assert "user.43" not in hub.hub.channels
    c = await open_stream(hub.port, f"/channels/user.42?token={t}")
    try:
        await redis_client.publish("user.42", "yours")
        (event,) = await c.next_events(1)
        assert event.data == "yours"
    finally:
        await c.close()
