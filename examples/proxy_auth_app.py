"""The application side of ``auth: proxy``: ssehub asks it who may open which stream.

Run it (``python examples/proxy_auth_app.py``) beside a hub whose config says::

    auth: {proxy: {url: "http://127.0.0.1:8001/sse-auth", cookies: [sessionid]}}
    channels: {"user.*": {auth: proxy}}

then ``curl -N -b sessionid=s3cr3t http://127.0.0.1:8080/channels/user.42``. In a real
application the lookup is your framework's session (Django's, Rails', …). It listens on
port 8001, or the one given as its argument.
"""

import sys

from aiohttp import web

SESSIONS = {"s3cr3t": "42"}  # your session store: session cookie -> user id


async def authorize(request: web.Request) -> web.Response:
    asked = await request.json()  # {"channels": [...], "cookies": {"sessionid": ...}}
    user = SESSIONS.get(asked["cookies"].get("sessionid", ""))
    if user is None:
        return web.json_response({"error": "not logged in"}, status=403)
    return web.json_response({"user": user, "channels": [f"user.{user}", "news.*"]})


app = web.Application()
app.router.add_post("/sse-auth", authorize)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]) if sys.argv[1:] else 8001)
