"""Routes for admins: tokens, auditor public keys, user CA keys, policy, legal holds, hosts
and the audit log.

Invariants: admin tokens only; every change goes through collector/admin.py (the CLI's
path too) and leaves an audit event naming the token that made it; nothing here touches a
recording, a session record or an authentication event (removing a key or a hold deletes
no data).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from sshaudit.collector import admin, tokens
from sshaudit.collector.deps import AdminToken, Ctx, actor
from sshaudit.collector.ids import CA_KEY_ID_PATTERN, HOLD_ID_PATTERN, KID_PATTERN, TOKEN_ID_PATTERN
from sshaudit.collector.models import AuditorKeyOut, ErrorBody, format_time
from sshaudit.collector.models_admin import (
    AuditEventOut,
    AuditorKeyIn,
    CaKeyIn,
    CaKeyOut,
    HoldIn,
    HoldOut,
    HostOut,
    PolicyIn,
    PolicyOut,
    TokenCreate,
    TokenCreated,
    TokenOut,
    audit_out,
    ca_key_out,
    hold_out,
    host_out,
    token_out,
)
from sshaudit.collector.problems import UnprocessableError
from sshaudit.collector.storage import TokenKind
from sshaudit.errors import UsageError

router = APIRouter(prefix="/v1/admin", tags=["admins"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 415, 422)
}


def _format_time(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


@router.get("/tokens", responses=_ERRORS)
def list_tokens(ctx: Ctx, _: AdminToken) -> list[TokenOut]:
    now = ctx.clock()
    return [token_out(t, tokens.token_state(t, now)) for t in ctx.storage.list_tokens()]


@router.post("/tokens", responses=_ERRORS)
def create_token(ctx: Ctx, token: AdminToken, body: TokenCreate) -> TokenCreated:
    """A new agent (enrollment), auditor, admin or user (with ``email``) token: shown once
    in the answer."""
    kind = TokenKind(body.role.value)
    try:
        ttl = tokens.DEFAULT_TTL[kind] if body.ttl is None else tokens.parse_ttl(body.ttl)
    except UsageError as exc:
        raise UnprocessableError(str(exc).replace("--ttl", "ttl"), code="invalid_ttl") from exc
    secret, record = admin.create_token(
        ctx.storage,
        kind,
        ctx.clock(),
        actor=actor(token),
        ttl=ttl,
        comment=body.comment,
        email=body.email,
        random_bytes=ctx.random_bytes,
    )
    return TokenCreated(
        token=secret,
        token_id=record.token_id,
        role=kind.value,
        expires_at=_format_time(record.expires_at),
    )


@router.post("/tokens/{token_id}/revoke", responses=_ERRORS)
def revoke_token(
    ctx: Ctx, token: AdminToken, token_id: Annotated[str, Path(pattern=TOKEN_ID_PATTERN)]
) -> TokenOut:
    now = ctx.clock()
    record = admin.revoke_token(ctx.storage, token_id, now, actor=actor(token))
    return token_out(record, tokens.token_state(record, now))


@router.get("/auditor-keys", responses=_ERRORS)
def list_auditor_keys(ctx: Ctx, _: AdminToken) -> list[AuditorKeyOut]:
    return [admin.auditor_key_out(k) for k in ctx.storage.list_auditor_keys()]


@router.post("/auditor-keys", responses=_ERRORS)
def add_auditor_key(ctx: Ctx, token: AdminToken, body: AuditorKeyIn) -> AuditorKeyOut:
    """Add an auditor's X25519 public key; agents seal new recordings to it from their next
    configuration refresh."""
    key = admin.add_auditor_key(
        ctx.storage, body.public_key, body.comment, ctx.clock(), actor=actor(token)
    )
    return admin.auditor_key_out(key)


@router.delete("/auditor-keys/{kid}", responses=_ERRORS, status_code=204)
def remove_auditor_key(
    ctx: Ctx, token: AdminToken, kid: Annotated[str, Path(pattern=KID_PATTERN)]
) -> None:
    """Stop sealing new recordings to this key (recordings already sealed keep it)."""
    admin.remove_auditor_key(ctx.storage, kid, ctx.clock(), actor=actor(token))


@router.get("/ca-keys", responses=_ERRORS)
def list_ca_keys(ctx: Ctx, _: AdminToken) -> list[CaKeyOut]:
    return [ca_key_out(k) for k in ctx.storage.list_ca_keys()]


@router.post("/ca-keys", responses=_ERRORS)
def add_ca_key(ctx: Ctx, token: AdminToken, body: CaKeyIn) -> CaKeyOut:
    """Trust a user CA (an OpenSSH public key line) on every enrolled host."""
    key = admin.add_ca_key(ctx.storage, body.line, ctx.clock(), actor=actor(token))
    return ca_key_out(key)


@router.delete("/ca-keys/{key_id}", responses=_ERRORS, status_code=204)
def remove_ca_key(
    ctx: Ctx, token: AdminToken, key_id: Annotated[str, Path(pattern=CA_KEY_ID_PATTERN)]
) -> None:
    admin.remove_ca_key(ctx.storage, key_id, ctx.clock(), actor=actor(token))


@router.get("/policy", responses=_ERRORS)
def get_policy(ctx: Ctx, _: AdminToken) -> PolicyOut:
    policy = ctx.storage.get_policy()
    return PolicyOut(
        policy=dict(policy.document),
        version=policy.version,
        updated_at=_format_time(policy.updated_at),
    )


@router.put("/policy", responses=_ERRORS)
def set_policy(ctx: Ctx, token: AdminToken, body: PolicyIn) -> PolicyOut:
    """Replace the policy handed to agents (docs/agent-config.md ``[policy]`` keys)."""
    now = ctx.clock()
    version = admin.set_policy(ctx.storage, body.policy, now, actor=actor(token))
    return PolicyOut(policy=body.policy, version=version, updated_at=_format_time(now))


@router.get("/holds", responses=_ERRORS)
def list_holds(ctx: Ctx, _: AdminToken) -> list[HoldOut]:
    return [hold_out(h) for h in ctx.storage.list_holds()]


@router.post("/holds", responses=_ERRORS)
def add_hold(ctx: Ctx, token: AdminToken, body: HoldIn) -> HoldOut:
    """A legal hold: retention never deletes the session, user or host it names."""
    hold = admin.add_hold(
        ctx.storage,
        body.kind,
        body.value,
        body.reason,
        ctx.clock(),
        actor=actor(token),
        random_bytes=ctx.random_bytes,
    )
    return hold_out(hold)


@router.delete("/holds/{hold_id}", responses=_ERRORS, status_code=204)
def remove_hold(
    ctx: Ctx, token: AdminToken, hold_id: Annotated[str, Path(pattern=HOLD_ID_PATTERN)]
) -> None:
    """Lift a legal hold (no data is deleted by this)."""
    admin.remove_hold(ctx.storage, hold_id, ctx.clock(), actor=actor(token))


@router.get("/hosts", responses=_ERRORS)
def list_hosts(ctx: Ctx, _: AdminToken) -> list[HostOut]:
    return [host_out(h) for h in ctx.storage.list_hosts()]


@router.get("/audit-events", responses=_ERRORS)
def list_audit_events(
    ctx: Ctx,
    _: AdminToken,
    after: Annotated[int, Query(ge=0, le=(1 << 62))] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventOut]:
    """The collector's own audit log, oldest first, after event id ``after``."""
    return [audit_out(e) for e in ctx.storage.list_audit(after, limit)]
