"""Every command README.md and docs/ show runs here as a reader would type it.

Each scenario below holds the commands of one passage, typed into real shells
(tests/terminal.py) against a hub started with ``./dev run``, Redis and curl, with the
docs' addresses moved to free ports. ``test_every_command_shown_is_run`` checks that
each line of an ``sh`` block in the docs is one of these commands, or in ``NOT_RUN``
with the reason it cannot run here, and that nothing here is stale.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .redis_server import RedisServer
from .terminal import ROOT, Desk, http_status

pytestmark = pytest.mark.slow

# --- the passages ------------------------------------------------------------------------

START = "./dev run"
# README "Publish and subscribe", getting-started "A first tour".
SUBSCRIBE = "curl -N http://127.0.0.1:8080/channels/chat"
PUBLISH = "redis-cli PUBLISH chat 'hello'"
NEWS = (
    "curl -N http://127.0.0.1:8080/channels/news",
    "redis-cli PUBLISH site:news 'fed to /channels/news'",
)
FAMILY = (
    "curl -N http://127.0.0.1:8080/channels/user.42",
    "redis-cli PUBLISH app:user:42 'You have a new message'",
)
EVENTS = (
    "curl -N 'http://127.0.0.1:8080/events?channel=chat&channel=prices'",
    """redis-cli PUBLISH prices '{"data": {"EURUSD": 1.08}, "event": "quote"}'""",
)
STREAM_RESUME = (
    "ID=$(redis-cli XADD app:orders '*' data 'first order')",
    "redis-cli XADD app:orders '*' data 'second order'",
    'curl -N -H "Last-Event-ID: $ID" http://127.0.0.1:8080/channels/orders',
)
# resume.md
PUBSUB_RESUME = (
    "ID=$(curl -sN --max-time 1 http://127.0.0.1:8080/channels/chat"
    " | sed -n 's/^id: //p' | tail -n 1)",
    "redis-cli PUBLISH chat 'while you were away'",
    'curl -N -H "Last-Event-ID: $ID" http://127.0.0.1:8080/channels/chat',
)
XADDS = (
    """redis-cli XADD app:orders '*' data '{"total": 3}'""",
    "redis-cli XADD app:orders '*' data 'shipped' event status retry 5000",
    "redis-cli XADD app:orders MAXLEN '~' 100000 '*' data 'bounded'",
)
REWIND = "curl -N 'http://127.0.0.1:8080/channels/news?rewind=3'"
CHECKS = (
    "./dev ssehub --config config/ssehub.yaml --check",
    "ssehub --config config/ssehub.yaml --check",
)
READYZ = "curl -i http://127.0.0.1:8080/readyz"

# README and getting-started "A private channel per user" (one terminal).
SECRET = "export SSEHUB_JWT_SECRET=$(head -c 32 /dev/urandom | base64)"
PRIVATE_START = "SSEHUB_CONFIG=config/examples/private.yaml ./dev run &"
STOP = "./dev stop"
PRIVATE = (
    "TOKEN=$(./dev ssehub token --config config/examples/private.yaml --sub 42"
    " --subscribe user.42)",
    'curl -N "http://127.0.0.1:8080/channels/user.42?token=$TOKEN" &',
    "redis-cli PUBLISH app:user:42 'for user 42 only'",
    'curl -i "http://127.0.0.1:8080/channels/user.43?token=$TOKEN"',
)
# access-control.md "Trying it" (one terminal).
TRYING = (
    "TOKEN=$(./dev ssehub token --config config/examples/private.yaml --sub 42"
    " --subscribe user.42 --subscribe 'news.*' --ttl 1h)",
    'curl -N -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/channels/user.42 &',
    'curl -N --cookie "ssehub_token=$TOKEN" http://127.0.0.1:8080/channels/user.42 &',
    "redis-cli PUBLISH app:user:42 'for user 42 only'",
    "curl -i http://127.0.0.1:8080/channels/user.42",
)

# juggernaut.md
JUGGERNAUT_START = "SSEHUB_CONFIG=config/examples/juggernaut.yaml ./dev run"
ROSTER = "redis-cli SUBSCRIBE juggernaut:subscribe juggernaut:unsubscribe"
JUGGERNAUT_PUBLISH = """redis-cli PUBLISH juggernaut '{"channels": ["chat"], "data": "hi"}'"""
EXCEPT = (
    """redis-cli PUBLISH chat '{"data": "hi", "except": "Xk3v_9aQ1cZ0mPq7"}'""",
    """redis-cli PUBLISH juggernaut '{"channels": ["chat"], "data": "hi", """
    """"except": ["a.1", "b.7"]}'""",
)
PRESENCE = (
    "curl -N 'http://127.0.0.1:8080/channels/room.7?meta=Ann'",
    "curl -s http://127.0.0.1:9090/channels/room.7/presence",
)

# scaling.md
WORKERS = (
    "SSEHUB_CONFIG=config/examples/workers.yaml ./dev run",
    "curl -s http://127.0.0.1:9090/metrics | grep '^ssehub_workers'",
)

# control.md (one hub, the example application; user 42 is s3cr3t's).
CONTROL_START = (
    "export SSEHUB_PUBLISH_KEY=$(head -c 24 /dev/urandom | base64)",
    "SSEHUB_CONFIG=config/examples/control.yaml ./dev run &",
    ".venv/bin/python examples/proxy_auth_app.py &",
)
_BEARER = 'curl -s -H "Authorization: Bearer $SSEHUB_PUBLISH_KEY" -d '
HTTP_PUBLISH = (
    _BEARER + """'{"channel": "chat", "data": "hi"}' http://127.0.0.1:9090/publish""",
    _BEARER + """'{"channel": "orders", "data": "shipped", "event": "status"}' """
    "http://127.0.0.1:9090/publish",
    _BEARER + """'[{"channel": "chat", "data": "one"}, {"channel": "prices", "data": """
    """{"EURUSD": 1.08}, "event": "quote"}]' http://127.0.0.1:9090/publish""",
)
DISCONNECTS = (
    "curl -N -b sessionid=s3cr3t http://127.0.0.1:8080/channels/user.42 &",
    """redis-cli PUBLISH ssehub:control '{"disconnect": {"user": "42", "reason": "logged out"}}'""",
    "redis-cli PUBLISH ssehub:control "
    """'{"disconnect": {"channel": "chat", "reason": "closed"}}'""",
    _BEARER + """'{"disconnect": {"user": "42", "reason": "banned", "reconnect": false, """
    """"refuse_seconds": 600}}' http://127.0.0.1:9090/disconnect""",
    "curl -i -b sessionid=s3cr3t http://127.0.0.1:8080/channels/user.42",
)
PROXY = (
    "curl -N -b sessionid=s3cr3t http://127.0.0.1:8080/channels/user.42",
    "curl -i -b sessionid=wrong http://127.0.0.1:8080/channels/user.42",
)

RUN = {
    START, SUBSCRIBE, PUBLISH, *NEWS, *FAMILY, *EVENTS, *STREAM_RESUME, *PUBSUB_RESUME,
    *XADDS, REWIND, *CHECKS, READYZ, SECRET, PRIVATE_START, STOP, *PRIVATE, *TRYING,
    JUGGERNAUT_START, ROSTER, JUGGERNAUT_PUBLISH, *EXCEPT, *PRESENCE, *WORKERS,
    *CONTROL_START, *HTTP_PUBLISH, *DISCONNECTS, *PROXY,
}  # fmt: skip

SYSTEMD = (
    "needs root on a systemd machine; tests/test_deploy.py verifies the unit with systemd-analyze"
)
DOCKER = "needs a Docker engine; tests/test_deploy.py builds and runs the image when one is there"
NOT_RUN = {
    "./dev test": "the suite itself: .ci/run runs exactly this",
    "python3 -m venv /opt/ssehub/venv && /opt/ssehub/venv/bin/pip install /path/to/ssehub": SYSTEMD,
    "install -D -m644 config/ssehub.yaml /etc/ssehub/ssehub.yaml": SYSTEMD,
    "install -m644 deploy/ssehub.service /etc/systemd/system/ssehub.service": SYSTEMD,
    "systemctl daemon-reload && systemctl enable --now ssehub": SYSTEMD,
    "systemctl reload ssehub": SYSTEMD,
    "systemctl status ssehub": SYSTEMD,
    "journalctl -u ssehub -f": SYSTEMD,
    "docker build -f deploy/Dockerfile -t ssehub .": DOCKER,
    "docker compose -f deploy/compose.yaml up --build": DOCKER,
    "docker compose -f deploy/compose.yaml exec redis redis-cli PUBLISH chat hello": DOCKER,
}


BENCH = (
    "a benchmark run: minutes to a quarter of an hour on both cores, not for the suite "
    "(tests/test_bench_smoke.py runs `python -m bench --smoke` with the venv's Python)"
)
NOT_RUN_PREFIXES = {".venv/bin/python -m bench": BENCH}  # bench/*.md, included in docs/


def _text(path: Path) -> str:
    """A page as the site shows it: with the files it includes (``--8<-- "file"``)."""
    return re.sub(
        r'^--8<-- "([^"]+)"$',
        lambda m: (ROOT / m.group(1)).read_text(),
        path.read_text(),
        flags=re.M,
    )


def shown_commands() -> Iterator[tuple[str, str]]:
    """(file, command) for every line of an ``sh`` block in README.md and docs/; a
    trailing ``# comment`` is not part of the command."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        blocks = re.findall(r"^```(?:sh|bash|shell|console)\n(.*?)^```", _text(path), re.M | re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if line and not line.startswith("#"):
                    yield str(path.relative_to(ROOT)), re.sub(r"\s+", " ", line)


def test_every_command_shown_is_run() -> None:
    shown = {cmd: where for where, cmd in shown_commands()}
    known = RUN | set(NOT_RUN)
    unrun = {
        cmd: where
        for cmd, where in shown.items()
        if cmd not in known and not cmd.startswith(tuple(NOT_RUN_PREFIXES))
    }
    assert not unrun, (
        "commands shown in the docs that no test runs (add each to a scenario in "
        f"tests/test_doc_commands.py, or to NOT_RUN with the reason): {unrun}"
    )
    assert not RUN & set(NOT_RUN)
    stale = sorted(known - set(shown))
    assert not stale, f"no longer shown in the docs: {stale}"


def _output_shown(page: str, first_line: str) -> str:
    """The ``text`` block of ``page`` that starts with ``first_line``."""
    for block in re.findall(r"^```text\n(.*?)^```", (ROOT / page).read_text(), re.M | re.S):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"{page}: no text block starting {first_line!r}")


def _shape(stream: str) -> str:
    """A stream with its session id and event ids replaced by their shape: the same on
    every run, and different for an id of another form."""

    def session(m: re.Match[str]) -> str:  # URL-safe characters, any of them anywhere
        return re.sub(r"[A-Za-z0-9_-]", "x", m.group(0))

    def event_id(m: re.Match[str]) -> str:  # <epoch>-<n>: base 36 around one dash
        return re.sub(r"[a-z0-9]", "x", m.group(0))

    stream = re.sub(r"(?m)(?<=^event: ssehub-session\ndata: )\S+$", session, stream)
    return re.sub(r"(?m)(?<=^id: )\S+$", event_id, stream).strip()


# --- the scenarios -----------------------------------------------------------------------


@pytest.fixture
def desk(tmp_path: Path, redis_server: RedisServer) -> Iterator[Desk]:
    desk = Desk(tmp_path, redis_server.port)
    try:
        yield desk
    finally:
        desk.close()


# A stream's id-only line (an event's id line is followed by its data): the stream is
# registered and its channels subscribed, so what is published next reaches it.
POSITION = r"^id: \S+\n\n"


def test_publish_subscribe_and_resume_as_the_first_tour_shows(desk: Desk) -> None:
    hub = desk.terminal()
    hub.type(START)
    desk.wait_ready()
    shell = desk.terminal()

    chat = desk.terminal()
    chat.type(SUBSCRIBE)
    chat.wait_for(POSITION)
    assert shell.run(PUBLISH).strip() == "1"
    shown = chat.wait_for(r"^data: hello\n\n")
    # What README and getting-started show the first terminal printing, ids aside.
    for page in ("README.md", "docs/getting-started.md"):
        assert _shape(shown) == _shape(_output_shown(page, "retry: 3000")), page

    for subscribe, publish, data in (
        (*NEWS, "fed to /channels/news"),
        (*FAMILY, "You have a new message"),
    ):
        term = desk.terminal()
        term.type(subscribe)
        term.wait_for(POSITION)
        shell.run(publish)
        term.wait_for(rf"^data: {data}$")

    events = desk.terminal()
    events.type(EVENTS[0])
    events.wait_for(POSITION)
    shell.run(EVENTS[1])
    events.wait_for(r"^event: prices:quote\ndata: \{\"EURUSD\":1.08\}$")

    # Stream channel resume: everything after $ID, then live.
    shell.run(STREAM_RESUME[0])
    shell.run(STREAM_RESUME[1])
    shell.type(STREAM_RESUME[2])
    out = shell.wait_for(r"^data: second order$")
    assert "data: first order" not in out
    shell.close()

    # Pub/sub resume from the position a stream left at.
    resume = desk.terminal()
    resume.run(PUBSUB_RESUME[0])
    resume.run(PUBSUB_RESUME[1])
    resume.type(PUBSUB_RESUME[2])
    out = resume.wait_for(r"^data: while you were away$")
    assert "data: hello" not in out

    shell = desk.terminal()
    for xadd in XADDS:
        assert re.fullmatch(r"\d+-\d+\n", shell.run(xadd))
    rewind = desk.terminal()
    rewind.type(REWIND)
    rewind.wait_for(r"^data: fed to /channels/news$")
    for check in CHECKS:
        assert ": ok (4 channels, 1 family, 1 worker)" in shell.run(check)
    ready = shell.run(READYZ)
    assert "HTTP/1.1 200 OK" in ready and ready.rstrip().endswith("ready")


def test_a_private_channel_per_user_end_to_end_and_a_token_three_ways(desk: Desk) -> None:
    term = desk.terminal()
    term.run(SECRET)
    term.run(PRIVATE_START)
    desk.wait_ready()
    term.run(PRIVATE[0])
    term.run(PRIVATE[1])
    term.wait_for(POSITION)
    term.run(PRIVATE[2])
    term.wait_for(r"^data: for user 42 only$")
    assert "HTTP/1.1 403 Forbidden" in term.run(PRIVATE[3])

    # access-control.md's passage goes on from the same start (its first two lines).
    term.run(TRYING[0])
    term.run(TRYING[1])
    term.run(TRYING[2])
    term.wait_for(POSITION, count=3)
    term.run(TRYING[3])
    term.wait_for(r"^data: for user 42 only$", count=4)  # the first stream, and these two
    out = term.run(TRYING[4])
    assert "HTTP/1.1 401 Unauthorized" in out and "WWW-Authenticate: Bearer" in out

    term.run(STOP)
    desk.wait_down()
    assert "stopping the hub" in term.output()


def test_juggernaut_publishers_except_events_and_presence(desk: Desk) -> None:
    hub = desk.terminal()
    hub.type(JUGGERNAUT_START)
    desk.wait_ready()
    roster = desk.terminal()
    roster.type(ROSTER)
    roster.wait_for(r"^juggernaut:unsubscribe$")  # redis-cli's confirmation
    chat = desk.terminal()
    chat.type(SUBSCRIBE)
    chat.wait_for(POSITION)
    roster.wait_for(r'"channel": ?"chat"')
    shell = desk.terminal()
    shell.run(JUGGERNAUT_PUBLISH)
    chat.wait_for(r"^data: hi$")
    for line in EXCEPT:  # sessions other than this stream's: it gets both
        shell.run(line)
    chat.wait_for(r"^data: hi$", count=3)

    room = desk.terminal()
    room.type(PRESENCE[0])
    room.wait_for(POSITION)
    deadline = time.monotonic() + 20
    while '"meta":"Ann"' not in (out := shell.run(PRESENCE[1])):
        # The presence writer batches, off the stream's path: ask again, as a reader would.
        assert time.monotonic() < deadline, out
        time.sleep(0.05)
    assert out.startswith('{"channel":"room.7","count":1,"members":[{"session_id":'), out


def test_workers_serve_one_node_and_one_scrape(desk: Desk) -> None:
    hub = desk.terminal()
    hub.type(WORKERS[0])
    desk.wait_ready()
    shell = desk.terminal()
    out = shell.run(WORKERS[1])
    assert re.fullmatch(r"ssehub_workers \d+\.0\n", out), out


def test_publish_disconnect_and_proxy_auth_as_the_control_plane_page_shows(
    desk: Desk, redis_server: RedisServer
) -> None:
    term = desk.terminal()
    for line in CONTROL_START:
        term.run(line)
    desk.wait_ready()
    deadline = time.monotonic() + 20
    while http_status(desk.app_port, "/sse-auth") is None:  # (a GET: 405 once it listens)
        assert time.monotonic() < deadline, desk.screens()
        time.sleep(0.05)
    try:
        chat = desk.terminal()
        chat.type(SUBSCRIBE)
        chat.wait_for(POSITION)
        shell = term  # where the key was exported
        assert shell.run(HTTP_PUBLISH[0]).strip() == '{"channel": "chat", "receivers": 1}'
        chat.wait_for(r"^data: hi$")
        assert re.fullmatch(r'\{"channel": "orders", "id": "\d+-\d+"\}', shell.run(HTTP_PUBLISH[1]))
        assert '"results": [{"channel": "chat", "receivers": 1}' in shell.run(HTTP_PUBLISH[2])
        chat.wait_for(r"^data: one$")

        # auth: proxy: the example application grants user 42 to s3cr3t's cookie.
        user = desk.terminal()
        user.type(PROXY[0])
        user.wait_for(POSITION)
        assert "HTTP/1.1 403 Forbidden" in shell.run(PROXY[1])

        # Disconnects: a user, a channel, then a ban that refuses the reconnect.
        shell.run(DISCONNECTS[0])
        shell.wait_for(POSITION)
        shell.run(DISCONNECTS[1])
        for t in (user, shell):
            t.wait_for(
                r'^event: ssehub-disconnect\ndata: \{"reason":"logged out","reconnect":true\}$'
            )
        shell.run(DISCONNECTS[2])
        chat.wait_for(r'^event: ssehub-disconnect\ndata: \{"reason":"closed","reconnect":true\}$')
        assert shell.run(DISCONNECTS[3]).strip() == '{"nodes": 1}'
        refused = shell.run(DISCONNECTS[4])
        assert "HTTP/1.1 403 Forbidden" in refused and "Retry-After: " in refused
    finally:
        # The ban of user 42 would outlive this test in the session's Redis.
        redis.Redis(port=redis_server.port).delete("ssehub:control:refusals")
