"""A token endpoint for the benchmark: issues ~900-byte Bearer tokens that live an hour.

Usage: python bench/token_server.py PORT [LIFETIME_SECONDS]
"""

from __future__ import annotations

import secrets
import sys

from aiohttp import web

CALLS = {"n": 0}


def make_app(lifetime: float) -> web.Application:
    async def token(_request: web.Request) -> web.Response:
        CALLS["n"] += 1
        return web.json_response(
            {
                "access_token": secrets.token_urlsafe(675),
                "token_type": "Bearer",
                "expires_in": lifetime,
            }
        )

    async def calls(_request: web.Request) -> web.Response:
        return web.json_response(CALLS)

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_get("/calls", calls)
    return app


if __name__ == "__main__":
    lifetime = float(sys.argv[2]) if len(sys.argv) > 2 else 3600.0
    web.run_app(
        make_app(lifetime), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None
    )
