"""The measuring stick: a minimal aiohttp reverse proxy that only swaps the Authorization header.

Usage: python bench/minimal_proxy.py PORT UPSTREAM_URL TOKEN_FILE
"""

from __future__ import annotations

import sys
import uuid

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "authorization"}


async def main_app(upstream: str, token: str) -> web.Application:
    app = web.Application()
    auth = f"Bearer {token}"

    async def on_startup(app: web.Application) -> None:
        app["client"] = aiohttp.ClientSession(auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app["client"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["Authorization"] = auth
        headers["X-Request-ID"] = str(uuid.uuid4())
        body = await request.read() if request.body_exists else None
        async with app["client"].request(
            request.method,
            upstream + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as resp:
            out = web.StreamResponse(status=resp.status)
            for k, v in resp.headers.items():
                if k.lower() not in HOP and k.lower() != "content-length":
                    out.headers.add(k, v)
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_chunked(65536):
                await out.write(chunk)
            await out.write_eof()
            return out

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


if __name__ == "__main__":
    port, upstream, token_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open(token_file) as fh:
        token = fh.read().strip()
    web.run_app(main_app(upstream, token), host="127.0.0.1", port=port, access_log=None, print=None)
