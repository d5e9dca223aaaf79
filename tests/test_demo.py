"""The demo page over HTTP (the browser drives it in test_browser.py)."""

from __future__ import annotations

import json
import re

from ssehub.http.demo import channels_json

from .conftest import StartHub, hub_config
from .sseclient import http_request


def embedded(body: bytes) -> dict[str, list[dict[str, str]]]:
    match = re.search(
        rb'<script type="application/json" id="ssehub-config">(.*?)</script>', body, re.S
    )
    assert match, body[:300]
    data: dict[str, list[dict[str, str]]] = json.loads(match.group(1))
    return data


async def test_page_lists_channels_with_publish_commands(start_hub: StartHub) -> None:
    hub = await start_hub({"chat": {}, "news": {"redis_channel": "site:news"}})
    status, headers, body = await http_request(hub.port, "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert b"new EventSource(" in body
    assert b'addEventListener("ssehub-gap"' in body
    assert embedded(body)["channels"] == [
        {
            "name": "chat",
            "url": "/channels/chat",
            "redis_channel": "chat",
            "auth": "public",
            "publish": "redis-cli PUBLISH chat 'hello'",
        },
        {
            "name": "news",
            "url": "/channels/news",
            "redis_channel": "site:news",
            "auth": "public",
            "publish": "redis-cli PUBLISH site:news 'hello'",
        },
    ]


async def test_demo_false_turns_the_page_off(start_hub: StartHub) -> None:
    hub = await start_hub(demo=False)
    assert (await http_request(hub.port, "/"))[0] == 404


def test_odd_redis_channel_names_are_quoted_and_cannot_break_out_of_the_script() -> None:
    config = hub_config("redis://127.0.0.1:1/0", {"x": {"redis_channel": "a b</script><i>'"}})
    text = channels_json(config)
    assert "</" not in text
    (channel,) = json.loads(text)["channels"]
    assert channel["redis_channel"] == "a b</script><i>'"
    # Shell-quoted, so the command can be pasted as is.
    assert channel["publish"] == "redis-cli PUBLISH 'a b</script><i>'\"'\"'' 'hello'"


def test_publish_command_for_a_json_channel_sends_a_payload_it_accepts() -> None:
    import shlex

    from ssehub.core.messages import parse_json

    config = hub_config("redis://127.0.0.1:1/0", {"prices": {"format": "json"}})
    (channel,) = json.loads(channels_json(config))["channels"]
    argv = shlex.split(channel["publish"])
    assert argv[:3] == ["redis-cli", "PUBLISH", "prices"]
    event = parse_json(argv[3].encode(), 1000)
    assert (event.data, event.event) == ("hello", "greeting")


def test_a_family_is_listed_with_its_star_for_the_page_to_fill_in() -> None:
    config = hub_config("redis://127.0.0.1:1/0", {"user.*": {"redis_channel": "app:user:*"}})
    (channel,) = json.loads(channels_json(config))["channels"]
    assert channel == {
        "name": "user.*",
        "url": "/channels/user.*",
        "redis_channel": "app:user:*",
        "publish": "redis-cli PUBLISH 'app:user:*' 'hello'",
        "auth": "public",
        "family": True,
    }


def test_a_stream_channel_is_published_to_with_xadd() -> None:
    import shlex

    from ssehub.core.messages import parse_entry

    config = hub_config(
        "redis://127.0.0.1:1/0", {"orders": {"stream": "app:orders", "format": "json"}}
    )
    (channel,) = json.loads(channels_json(config))["channels"]
    argv = shlex.split(channel["publish"])
    assert argv[:5] == ["redis-cli", "XADD", "app:orders", "*", "data"]
    assert parse_entry("json", "1-0", {b"data": argv[5].encode()}, 1000).data == "hello"


async def test_proxy_channels_are_marked_and_disconnects_shown(start_hub: StartHub) -> None:
    auth = {"proxy": {"url": "http://127.0.0.1:1/auth", "cookies": ["sessionid"]}}
    hub = await start_hub({"chat": {}, "user.*": {"auth": "proxy"}}, auth=auth)
    _, _, body = await http_request(hub.port, "/")
    member = embedded(body)["channels"][1]
    assert (member["name"], member["auth"], member["family"]) == ("user.*", "proxy", True)
    assert b"private: your application" in body
    assert b'addEventListener("ssehub-disconnect"' in body
