"""A test upstream API: checks the token with the test identity provider, records what it saw,
and has routes for streaming, uploads, redirects, slowness, resets and WebSockets.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.idp import FakeIdP

CHUNK = 1 << 16


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path_qs: str
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    #: whether its Bearer token was one the provider issued and still valid when it arrived
    token_valid: bool = False


@dataclass
class FakeUpstream:
    """Answers 401 to any request whose Bearer token the identity provider did not issue."""

    idp: FakeIdP | None = None
    seen: list[Seen] = field(default_factory=list)
    rejected: int = 0
    #: False: the echo leaves Authorization out, so any token in a response is the proxy's leak
    echo_authorization: bool = True

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/ws", self._ws)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    def _token_ok(self, request: web.Request) -> bool:
        if self.idp is None:
            return True
        auth = request.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and self.idp.is_valid(auth[7:])

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        valid = self._token_ok(request)
        self.seen.append(
            Seen(
                request.method,
                request.path_qs,
                dict(request.headers),
                list(request.headers.items()),
                valid,
            )
        )
        if not valid:
            self.rejected += 1
            return web.json_response(
                {"error": "invalid_token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        parts = request.path.strip("/").split("/")
        handler = getattr(self, f"_route_{parts[0]}", None) if parts[0] else None
        if handler is None:
            return await self._echo(request)
        response: web.StreamResponse = await handler(request, parts[1:])
        return response

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "query_string": request.query_string,
                "headers": {
                    k: v
                    for k, v in request.headers.items()
                    if self.echo_authorization or k.lower() != "authorization"
                },
                "body": body.decode("latin-1"),
            }
        )

    async def _route_stream(self, request: web.Request, args: list[str]) -> web.StreamResponse:
        total = int(args[0])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = total
        await response.prepare(request)
        block = b"x" * CHUNK
        sent = 0
        while sent < total:
            piece = block[: min(CHUNK, total - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def _route_upload(self, request: web.Request, _args: list[str]) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {
                "bytes": size,
                "sha256": digest.hexdigest(),
                "chunked": request.headers.get("Transfer-Encoding") == "chunked",
            }
        )

    async def _route_redirect(self, _request: web.Request, _args: list[str]) -> web.Response:
        return web.Response(status=302, headers={"Location": "http://elsewhere.invalid/steal"})

    async def _route_slow(self, _request: web.Request, args: list[str]) -> web.Response:
        await asyncio.sleep(float(args[0]))
        return web.json_response({"slept": float(args[0])})

    async def _route_status(self, _request: web.Request, args: list[str]) -> web.Response:
        return web.json_response({"status": int(args[0])}, status=int(args[0]))

    async def _route_reset(self, request: web.Request, _args: list[str]) -> web.StreamResponse:
        """Promise 1 MiB, send 64 KiB, then drop the connection."""
        response = web.StreamResponse()
        response.content_length = 1 << 20
        await response.prepare(request)
        await response.write(b"y" * CHUNK)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _route_drop(self, request: web.Request, _args: list[str]) -> web.StreamResponse:
        """Close the connection without answering."""
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    async def _route_cookies(self, _request: web.Request, _args: list[str]) -> web.Response:
        response = web.json_response({"ok": True})
        response.set_cookie("a", "1")
        response.set_cookie("b", "2")
        return response

    async def _route_setcookie(self, _request: web.Request, args: list[str]) -> web.Response:
        """``/setcookie/<name>/<value>[/<max-age>]``: an API that rotates a session cookie."""
        response = web.json_response({"ok": True})
        max_age = int(args[2]) if len(args) > 2 else None
        response.set_cookie(args[0], args[1], path="/", max_age=max_age)
        return response

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen("GET", request.path_qs, dict(request.headers), list(request.headers.items()))
        )
        if not self._token_ok(request):
            self.rejected += 1
            return web.json_response({"error": "invalid_token"}, status=401)
        ws = web.WebSocketResponse(protocols=("chat.v1",))
        await ws.prepare(request)
        await ws.send_json({"hello": dict(request.headers.items())})
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data == "close":
                    await ws.close(code=4001, message=b"bye")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws


def header_values(seen: Seen, name: str) -> list[Any]:
    """All values of one header as the upstream received them (case-insensitive)."""
    return [v for k, v in seen.header_list if k.lower() == name.lower()]
