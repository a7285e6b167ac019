"""The HTTP edge: bounded request bodies and one JSON shape for every error.

Invariants:
- no request body larger than its route's limit is ever held: a body without a
  ``Content-Length`` (chunked) is counted as it streams and dropped at the first byte past
  the limit; the route gets the whole body at once (never a partial one);
- an oversized body is answered 413, after reading and discarding it if it is at most
  :data:`DISCARD_MAX` (so a client still sending can read the answer instead of meeting a
  connection reset: the "lingering close" of RFC 9112 section 9.6); a ``Content-Length``
  above that (a 2 GB claim) is answered at once, before a byte of the body is read;
- every error leaves as ``{"error": code, "detail": ...}`` with a 4xx for anything the
  client did (validation errors list ``loc``/``msg``/``type`` only, never the input back),
  and a 500 ``internal_error`` that says nothing more for a bug (logged with its traceback).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from sshaudit.collector.metrics import Metrics
from sshaudit.collector.problems import CollectorError

log = logging.getLogger("sshaudit.collector")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DISCARD_MAX = 64 << 20

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "invalid_request",
}


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    # The rest of an oversized body is never read: ask the client to close the connection.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Pure ASGI middleware: buffer each request body up to ``limit(method, path)``."""

    def __init__(self, app: ASGIApp, limit: Callable[[str, str], int], metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["method"], scope["path"])
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared:
            try:
                length = int(declared[0])
            except ValueError:
                await self._refuse(send, 400, "bad_request", "invalid Content-Length")
                return
            if length > limit:
                if length > DISCARD_MAX or await _discard(receive, 0):
                    await self._too_large(send, limit)
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nothing to answer
            body = message.get("body", b"")
            total += len(body)
            more = message.get("more_body", False)
            if total > limit:
                chunks.clear()
                if not more or await _discard(receive, total):
                    await self._too_large(send, limit)
                return
            chunks.append(body)
            if not more:
                break
        await self.app(scope, _Replay(b"".join(chunks), receive), send)

    async def _too_large(self, send: Send, limit: int) -> None:
        await self._refuse(
            send, 413, "body_too_large", f"the request body is larger than {limit} bytes", limit
        )

    async def _refuse(
        self, send: Send, status: int, code: str, detail: str, limit: int | None = None
    ) -> None:
        self.metrics.inc("sshaudit_collector_errors_total", status=str(status), code=code)
        body: dict[str, Any] = {"error": code, "detail": detail}
        if limit is not None:
            body["limit"] = limit
        await _send_json(send, status, body)


async def _discard(receive: Receive, seen: int) -> bool:
    """Read and drop the rest of a body, up to DISCARD_MAX in all; False if the client
    went away (nobody to answer)."""
    while seen <= DISCARD_MAX:
        message = await receive()
        if message["type"] != "http.request":
            return False
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return True


async def whole_body(request: Request) -> bytes:
    """The request body as :class:`BodyLimit` buffered it: its one message, taken as is.
    ``Request.body()`` would copy it again (it joins the body with a final empty chunk),
    which measurably costs upload throughput (docs/benchmarks.md)."""
    message = await request.receive()
    if message["type"] != "http.request":
        raise ClientDisconnect()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return bytes(body)
    parts = [body]
    while message.get("more_body", False):
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        parts.append(message.get("body", b""))
    return b"".join(parts)


class _Replay:
    """Hands the buffered body to the app once, then passes on (for disconnects)."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self._body: bytes | None = body
        self._receive = receive

    async def __call__(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self._receive()


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def respond(status: int, body: dict[str, Any], headers: Mapping[str, str] | None) -> Response:
        metrics.inc("sshaudit_collector_errors_total", status=str(status), code=body["error"])
        return JSONResponse(body, status_code=status, headers=headers)

    async def collector_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CollectorError)
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return respond(exc.status, exc.body(), exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body_unread = any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors())
        if body_unread and media != "application/json":
            # FastAPI parses a body as JSON only when it says it is JSON.
            message = "send the body as JSON, with Content-Type: application/json"
            return respond(415, {"error": "unsupported_media_type", "detail": message}, None)
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return respond(422, {"error": "invalid_request", "detail": detail}, None)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = _STATUS_CODES.get(exc.status_code, "error")
        return respond(exc.status_code, {"error": code, "detail": exc.detail}, exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        body = {"error": "internal_error", "detail": "internal error (logged by the collector)"}
        return respond(500, body, None)

    app.add_exception_handler(CollectorError, collector_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
