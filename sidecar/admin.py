"""The admin app on :8081: /metrics, /healthz, /readyz, /session and the session POSTs.

POSTs that carry an ``Origin`` header are refused: a web page in the developer's browser must not be
able to log the sidecar out or force refreshes (browsers add Origin to cross-site POSTs). POSTs from
non-loopback addresses are refused too, for when the admin port listens on a pod's network.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from sidecar.config.models import is_loopback
from sidecar.errors import NoSessionError
from sidecar.metrics import Metrics
from sidecar.session.manager import SessionManager, State

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def admin_app(
    session: SessionManager,
    metrics: Metrics,
    draining: Callable[[], bool] = lambda: False,
    listening: Callable[[], bool] = lambda: True,
) -> web.Application:
    """Build the admin application. While ``draining()`` (shutting down), /readyz says 503 so
    that traffic is steered elsewhere while the requests in flight finish; so it does until
    ``listening()`` (the proxy port is open: under --workers, once every worker is).

    ``/readyz?outage=keep-serving`` is the readiness a pod's probe uses: ready once the session
    held a token, and still ready when that token expired while the provider is down (calls get
    503 ``no_session`` meanwhile), so that an outage of the one provider every replica shares
    does not take all of them out of service at once."""

    async def get_metrics(_request: web.Request) -> web.Response:
        session.update_gauges()
        return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        outage = request.query.get("outage")
        if outage not in (None, "keep-serving"):
            return web.json_response(
                {"error": "bad_query", "detail": "outage may only be keep-serving"}, status=400
            )
        state = session.state()
        stopping = draining()
        open_ = listening()
        held = state is State.VALID or (outage is not None and state is State.EXPIRED)
        ready = held and not stopping and open_
        body: dict[str, object] = {"ready": ready, "state": state.value}
        if stopping:
            body["draining"] = True
        if not open_:
            body["proxy"] = "starting"
        return web.json_response(body, status=200 if ready else 503)

    async def get_session(_request: web.Request) -> web.Response:
        return web.json_response(session.summary())

    async def post_refresh(request: web.Request) -> web.Response:
        _refuse_cross_site(request)
        try:
            await session.force_refresh()
        except NoSessionError as exc:
            return web.json_response(
                {"error": exc.code, "detail": str(exc)},
                status=503,
                headers={"X-Sidecar-Error": "1"},
            )
        return web.json_response(session.summary())

    async def post_logout(request: web.Request) -> web.Response:
        _refuse_cross_site(request)
        await session.logout()
        return web.json_response(session.summary())

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/session", get_session)
    app.router.add_post("/session/refresh", post_refresh)
    app.router.add_post("/session/logout", post_logout)
    return app


def _refuse_cross_site(request: web.Request) -> None:
    # the admin port may listen on the pod network for probes and scrapes; the actions that
    # change the session are for processes on this host (or pod) only
    if request.remote is not None and not is_loopback(request.remote):
        raise web.HTTPForbidden(
            text=json.dumps(
                {"error": "not_loopback", "detail": "admin POSTs are accepted from loopback only"}
            ),
            content_type="application/json",
            headers={"X-Sidecar-Error": "1"},
        )
    if "Origin" in request.headers:
        raise web.HTTPForbidden(
            text=json.dumps(
                {"error": "cross_site_refused", "detail": "admin POSTs from web pages are refused"}
            ),
            content_type="application/json",
            headers={"X-Sidecar-Error": "1"},
        )
