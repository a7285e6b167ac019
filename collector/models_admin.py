"""JSON bodies of the admin routes (tokens, keys, CA keys, policy, holds, hosts, audit log).

Invariants: as collector/models.py: frozen inputs that refuse unknown fields, bounded
strings; no output model has a field for a token's hash or any secret (a token appears once,
in :class:`TokenCreated`).
"""

from __future__ import annotations

import base64
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from sshaudit.collector.models import PolicyDocument, format_time
from sshaudit.collector.storage import AuditEvent, CaKey, Hold, HoldKind, Host, TokenRecord

_IN = ConfigDict(frozen=True, extra="forbid")


class Role(Enum):
    """The kinds of token an admin can make (host credentials come from enrollment)."""

    AGENT = "agent"
    AUDITOR = "auditor"
    ADMIN = "admin"
    USER = "user"


class TokenCreate(BaseModel):
    model_config = _IN

    role: Role
    ttl: Annotated[str | None, Field(max_length=16, strict=True)] = Field(
        default=None, description="e.g. 30d, 12h, 2w or never; default per role"
    )
    comment: Annotated[str, Field(max_length=256, strict=True)] = ""
    email: Annotated[str | None, Field(max_length=254, strict=True)] = Field(
        default=None, description="role user only, and required there: whose token it is"
    )


class TokenCreated(BaseModel):
    token: str = Field(description="shown once: only its hash is stored")
    token_id: str
    role: str
    expires_at: str | None


class TokenOut(BaseModel):
    token_id: str
    role: str
    state: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    used_at: str | None
    host_id: str | None
    comment: str
    email: str | None = None


def _t(moment: Any) -> str | None:
    return None if moment is None else format_time(moment)


def token_out(record: TokenRecord, state: str) -> TokenOut:
    return TokenOut(
        token_id=record.token_id,
        role=record.kind.value,
        state=state,
        created_at=format_time(record.created_at),
        expires_at=_t(record.expires_at),
        revoked_at=_t(record.revoked_at),
        used_at=_t(record.used_at),
        host_id=record.host_id,
        comment=record.comment,
        email=record.email,
    )


class AuditorKeyIn(BaseModel):
    model_config = _IN

    public_key: Annotated[str, Field(max_length=64, strict=True)] = Field(
        description="X25519 public key: 32 bytes, standard base64 (FORMAT.md)"
    )
    comment: Annotated[str, Field(max_length=256, strict=True)] = ""


class CaKeyIn(BaseModel):
    model_config = _IN

    line: Annotated[str, Field(max_length=16384, strict=True)] = Field(
        description="an OpenSSH public key line: type base64 [comment]"
    )


class CaKeyOut(BaseModel):
    key_id: str
    fingerprint: str
    line: str
    added_at: str


def ca_key_out(key: CaKey) -> CaKeyOut:
    return CaKeyOut(
        key_id=key.key_id,
        fingerprint=key.fingerprint,
        line=key.line,
        added_at=format_time(key.added_at),
    )


class PolicyIn(BaseModel):
    model_config = _IN

    policy: PolicyDocument


class PolicyOut(BaseModel):
    policy: dict[str, JsonValue]
    version: int
    updated_at: str | None


class HoldIn(BaseModel):
    model_config = _IN

    kind: HoldKind
    value: Annotated[str, Field(min_length=1, max_length=320, strict=True)]
    reason: Annotated[str, Field(max_length=256, strict=True)] = ""


class HoldOut(BaseModel):
    hold_id: str
    kind: str
    value: str
    reason: str
    created_at: str
    created_by: str


def hold_out(hold: Hold) -> HoldOut:
    return HoldOut(
        hold_id=hold.hold_id,
        kind=hold.kind.value,
        value=hold.value,
        reason=hold.reason,
        created_at=format_time(hold.created_at),
        created_by=hold.created_by,
    )


class HostOut(BaseModel):
    host_id: str
    hostname: str
    host_public_key: str
    enrolled_at: str
    backlog_sessions: int
    backlog_bytes: int
    backlog_at: str | None
    last_seen: str | None


def host_out(host: Host) -> HostOut:
    return HostOut(
        host_id=host.host_id,
        hostname=host.hostname,
        host_public_key=base64.b64encode(host.public_key).decode(),
        enrolled_at=format_time(host.enrolled_at),
        backlog_sessions=host.backlog_sessions,
        backlog_bytes=host.backlog_bytes,
        backlog_at=_t(host.backlog_at),
        last_seen=_t(host.last_seen),
    )


class AuditEventOut(BaseModel):
    event_id: int
    at: str
    actor: str
    action: str
    subject: str
    detail: dict[str, JsonValue]


def audit_out(event: AuditEvent) -> AuditEventOut:
    return AuditEventOut(
        event_id=event.event_id,
        at=format_time(event.at),
        actor=event.actor,
        action=event.action,
        subject=event.subject,
        detail=dict(event.detail),
    )
