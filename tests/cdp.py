"""A headless Chromium driven over the DevTools protocol: no driver download, no selenium.

Starts Debian's ``chromium`` with ``--remote-debugging-port=0``, reads the browser's
websocket address from its stderr, opens one page target and talks CDP to it over
aiohttp's websocket client. Just enough for the browser test: navigate, evaluate,
click at an element's centre with real mouse events, poll the DOM with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["Browser", "chromium_path", "launch"]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # the tests may run as root, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def chromium_path() -> str | None:
    """Debian's chromium, as ``./dev test`` installs it."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One page in a headless Chromium."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._session = session
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.create_task(self._read())
        self.console: list[str] = []

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            fut = self._waiting.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                if "error" in data:
                    fut.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    fut.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in args)
                )
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, timeout: float = 15.0, **params: Any) -> Any:
        """One CDP command; its result."""
        msg_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        return await asyncio.wait_for(fut, timeout)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"JS error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str, timeout: float = 15.0) -> None:
        """Navigate and wait until the document has loaded."""
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", timeout)

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll a JavaScript expression until truthy; AssertionError at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"not true within {timeout}s: {expression}")
            await asyncio.sleep(0.05)

    async def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element ``selector`` matches."""
        box = await self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )

    async def text(self, selector: str) -> str:
        """The text content of the first element ``selector`` matches ('' if none)."""
        value = await self.evaluate(
            f"document.querySelector({json.dumps(selector)})?.textContent ?? ''"
        )
        return str(value)

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def _devtools_url(proc: subprocess.Popen[bytes], log: str, timeout: float) -> str:
    """Poll Chromium's stderr (a file, so it can never fill a pipe) for the DevTools URL."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        text = _read(log)
        match = re.search(r"DevTools listening on (ws://\S+)", text)
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"chromium exited {proc.returncode}: {text[-2000:]}")
        if loop.time() > deadline:
            raise AssertionError(f"chromium did not start within {timeout}s: {text[-2000:]}")
        await asyncio.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # Chromium runs helpers (zygote, renderers) in the process group it was started
    # in; end that whole group, which this test created, and reap the browser.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # helpers that outlived the browser


def _read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _spawn(exe: str, profile: str, log: str) -> subprocess.Popen[bytes]:
    # Its own session (process group), so _stop() can end every helper it forks.
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )


@contextlib.asynccontextmanager
async def launch(exe: str, timeout: float = 30.0) -> AsyncIterator[Browser]:
    """Start Chromium, open one page, yield it; Chromium is stopped in any case."""
    profile = tempfile.mkdtemp(prefix="ssehub-chromium-")
    log = os.path.join(profile, "stderr.log")
    proc = _spawn(exe, profile, log)
    try:
        browser_ws = await _devtools_url(proc, log, timeout)
        http = "http://" + browser_ws.split("/")[2]
        async with aiohttp.ClientSession() as session:
            # The page target Chromium opened with about:blank.
            async with session.get(f"{http}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            browser = Browser(session, ws)
            try:
                await browser.send("Page.enable")
                await browser.send("Runtime.enable")
                yield browser
            finally:
                await browser.close()
    finally:
        _stop(proc)
        shutil.rmtree(profile, ignore_errors=True)
