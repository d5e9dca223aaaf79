"""The HTTP side: the aiohttp app, stream handler, auth, CORS, presence, admin, metrics, demo."""
