"""The collector's HTTP API (FastAPI): :func:`create_app` wires storage, limits, routes.

Routes: ``/healthz``, ``/metrics``, ``/openapi.json`` (no token); ``/v1/enroll`` and
``/v1/host/*`` and the uploads under ``/v1/sessions/{id}`` (hosts); ``GET /v1/sessions``,
``/v1/sessions/{id}``, ``/v1/sessions/{id}/recording``, ``/v1/auth-events`` (auditors);
``/v1/admin/*`` (admins); ``/v1/certificates`` (users: the built-in user CA, routes_ca.py).
docs/collector.md describes them; docs/openapi.json is this app's description, regenerated
by ``scripts/openapi``.

Invariants: no route deletes or rewrites a recording, a session record or an event (there
is no DELETE or PATCH under ``/v1/sessions`` or ``/v1/auth-events``; tests check the
OpenAPI description for it); every body is bounded before it is read (collector/asgi.py);
interactive docs pages are off (they load scripts from a CDN).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from sshaudit import __version__
from sshaudit.collector import routes_admin, routes_ca, routes_ingest, routes_query
from sshaudit.collector.asgi import BodyLimit, install_error_handlers
from sshaudit.collector.deps import Context, Ctx
from sshaudit.collector.metrics import CONTENT_TYPE

DESCRIPTION = """\
The central service of sshaudit: enrolled hosts ship sealed SSH session recordings, session
records and authentication events; auditors list, filter and download them. The collector
never holds a private key and never decrypts a recording. Every error is a JSON object
`{"error": code, "detail": ...}`. Authentication: `Authorization: Bearer sa_<kind>_...`.
"""


def create_app(ctx: Context) -> FastAPI:
    app = FastAPI(
        title="sshaudit collector",
        version=__version__,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    install_error_handlers(app, ctx.metrics)
    app.add_middleware(BodyLimit, limit=ctx.settings.body_limit, metrics=ctx.metrics)
    app.include_router(routes_ingest.router)
    app.include_router(routes_query.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_ca.router)

    @app.get("/healthz", tags=["service"])
    def healthz(ctx: Ctx) -> dict[str, str]:
        """200 ``{"status": "ok"}`` when the storage answers."""
        ctx.storage.ping()
        return {"status": "ok"}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def metrics(ctx: Ctx) -> PlainTextResponse:
        """Prometheus text format: uploads, bytes, frames, errors, per-host backlog."""
        text = ctx.metrics.render(ctx.storage.list_hosts())
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    return app
