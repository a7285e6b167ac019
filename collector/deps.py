"""What every route gets: the collector's context (storage, clock, limits, metrics) and
the caller's identity, as FastAPI dependencies.

Invariants: every route but ``/healthz``, ``/metrics`` and ``/openapi.json`` needs a bearer
token (RFC 6750) of the right kind, checked before the route body runs; a host credential
resolves to its enrolled host, whose id is the only one it may write; the clock and the
random source are the context's, so tests swap them without monkeypatching.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sshaudit.collector import tokens
from sshaudit.collector.metrics import Metrics
from sshaudit.collector.problems import ForbiddenError, UnauthorizedError
from sshaudit.collector.storage import Host, Storage, TokenKind, TokenRecord
from sshaudit.collector.upload import MAX_PREFIX
from sshaudit.sealed import MAX_FRAME, MAX_TRAILER


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Settings:
    """Limits. A chunk must hold at least one largest frame and a trailer."""

    max_chunk: int = 8 << 20
    max_json: int = 1 << 20
    page_default: int = 100
    page_max: int = 1000

    def __post_init__(self) -> None:
        if self.max_chunk < 4 + MAX_FRAME + 8 + MAX_TRAILER:
            raise ValueError("max_chunk must hold one largest frame and a trailer")

    def body_limit(self, method: str, path: str) -> int:
        if path.startswith("/v1/sessions/") and path.endswith("/recording"):
            if method == "PUT":
                return MAX_PREFIX
            if method == "POST":
                return self.max_chunk
        return self.max_json


@dataclass(frozen=True)
class Context:
    storage: Storage
    settings: Settings = field(default_factory=Settings)
    clock: Callable[[], datetime] = utc_now
    random_bytes: Callable[[int], bytes] = os.urandom
    metrics: Metrics = field(default_factory=Metrics)
    user_ca_key: Path | None = None  # the built-in user CA's key file (user_ca_store.py)


def get_ctx(request: Request) -> Context:
    return cast(Context, request.app.state.ctx)


Ctx = Annotated[Context, Depends(get_ctx)]
_bearer = HTTPBearer(auto_error=False, description="an sshaudit token: sa_<kind>_...")


def caller(
    ctx: Ctx, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> TokenRecord:
    if cred is None:
        raise UnauthorizedError("an Authorization: Bearer token is required", code="missing_token")
    return tokens.authenticate(ctx.storage, cred.credentials, ctx.clock())


def require(*kinds: TokenKind) -> Callable[[TokenRecord], TokenRecord]:
    names = " or ".join(k.value for k in kinds)

    def check(token: Annotated[TokenRecord, Depends(caller)]) -> TokenRecord:
        if token.kind not in kinds:
            raise ForbiddenError(f"this needs a {names} token", code="wrong_role")
        return token

    return check


def _host(ctx: Ctx, token: Annotated[TokenRecord, Depends(require(TokenKind.HOST))]) -> Host:
    host = None if token.host_id is None else ctx.storage.get_host(token.host_id)
    if host is None:
        raise UnauthorizedError("this credential's host is not enrolled", code="invalid_token")
    return host


def actor(token: TokenRecord) -> str:
    return f"token:{token.token_id}"


AuditorToken = Annotated[TokenRecord, Depends(require(TokenKind.AUDITOR))]
AdminToken = Annotated[TokenRecord, Depends(require(TokenKind.ADMIN))]
EnrollmentToken = Annotated[TokenRecord, Depends(require(TokenKind.AGENT))]
UserToken = Annotated[TokenRecord, Depends(require(TokenKind.USER))]
AnyToken = Annotated[TokenRecord, Depends(caller)]
HostCaller = Annotated[Host, Depends(_host)]
