"""Administration shared by the API (admin role) and the CLI (whoever may read the data
directory): tokens, enrollment, auditor keys, user CA keys, policy, legal holds.

Invariants: the API and the CLI go through these same functions, so they validate alike and
both leave an audit event for every change; a token is returned once, to the caller, and
only its hash is stored; keys are checked strictly before they are stored (an auditor key is
FORMAT.md's 32-byte X25519 base64, a CA key an OpenSSH public key line without options).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from sshaudit.collector import tokens, user_ca
from sshaudit.collector.ids import is_host_id, is_session_id
from sshaudit.collector.models import (
    MAX_POLICY,
    AuditorKeyOut,
    EnrollRequest,
    EnrollResponse,
    HostConfig,
    check_json,
    format_time,
)
from sshaudit.collector.problems import ForbiddenError, NotFoundError, UnprocessableError
from sshaudit.collector.retention import parse_policy as parse_retention
from sshaudit.collector.storage import (
    AuditEvent,
    AuditorKey,
    CaKey,
    Hold,
    HoldKind,
    Host,
    Storage,
    TokenKind,
    TokenRecord,
)
from sshaudit.errors import KeyFileError
from sshaudit.keys import AuditorPublicKey

_CA_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
_COMMENT_RE = re.compile(r"[\x20-\x7e]{0,256}")
_U32 = struct.Struct(">I")
RandomBytes = Callable[[int], bytes]


def create_token(
    storage: Storage,
    kind: TokenKind,
    now: datetime,
    *,
    actor: str,
    ttl: timedelta | None,
    comment: str = "",
    email: str | None = None,
    random_bytes: RandomBytes = os.urandom,
) -> tuple[str, TokenRecord]:
    if kind is TokenKind.HOST:
        raise UnprocessableError(
            "host credentials are made by enrollment only", code="invalid_role"
        )
    _comment(comment)
    _token_email(kind, email)
    token, record = tokens.new_token(
        kind, now, ttl=ttl, comment=comment, email=email, random_bytes=random_bytes
    )
    storage.add_token(record)
    detail = {"kind": kind.value, "expires_at": _opt_time(record.expires_at)}
    if email is not None:
        detail["email"] = email
    storage.audit(AuditEvent(now, actor, "token_created", record.token_id, detail))
    return token, record


def _token_email(kind: TokenKind, email: str | None) -> None:
    """A user token names its person (the certificate key id); no other kind has one."""
    if kind is TokenKind.USER:
        if email is None:
            raise UnprocessableError("a user token needs an email", code="missing_email")
        user_ca.check_email(email)
    elif email is not None:
        raise UnprocessableError("only user tokens carry an email", code="invalid_email")


def revoke_token(storage: Storage, token_id: str, now: datetime, *, actor: str) -> TokenRecord:
    record = storage.revoke_token(token_id, now)
    if record is None:
        raise NotFoundError(f"no token {token_id}", code="unknown_token")
    storage.audit(AuditEvent(now, actor, "token_revoked", token_id, {"kind": record.kind.value}))
    return record


def _opt_time(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def _comment(comment: str) -> str:
    if not _COMMENT_RE.fullmatch(comment):
        raise UnprocessableError(
            "a comment is at most 256 printable ASCII characters", code="invalid_comment"
        )
    return comment


def host_config(storage: Storage, host_id: str) -> HostConfig:
    policy = storage.get_policy()
    return HostConfig(
        host_id=host_id,
        auditor_keys=[auditor_key_out(k) for k in storage.list_auditor_keys()],
        ca_keys=[k.line for k in storage.list_ca_keys()],
        policy=dict(policy.document),
        policy_version=policy.version,
    )


def auditor_key_out(key: AuditorKey) -> AuditorKeyOut:
    return AuditorKeyOut(
        kid=key.kid,
        public_key=base64.b64encode(key.public_key).decode(),
        comment=key.comment,
        added_at=format_time(key.added_at),
    )


def enroll(
    storage: Storage,
    token: TokenRecord,
    request: EnrollRequest,
    now: datetime,
    *,
    random_bytes: RandomBytes = os.urandom,
) -> EnrollResponse:
    """Exchange a one-time enrollment token for a host id and a host credential."""
    if token.kind is not TokenKind.AGENT:
        raise ForbiddenError("enrollment needs an enrollment (agent) token", code="wrong_role")
    try:
        raw = base64.b64decode(request.host_public_key, validate=True)
        Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise UnprocessableError(
            "host_public_key must be an Ed25519 public key: 32 bytes in standard base64",
            code="invalid_host_key",
        ) from None
    host_id = str(uuid.UUID(bytes=random_bytes(16), version=4))
    credential, record = tokens.new_token(
        TokenKind.HOST,
        now,
        ttl=None,
        comment=f"host {request.hostname}",
        host_id=host_id,
        random_bytes=random_bytes,
    )
    host = Host(host_id, request.hostname, raw, now, token.token_id)
    storage.enroll_host(token, host, record)
    detail = {"hostname": request.hostname, "host_key": request.host_public_key}
    storage.audit(AuditEvent(now, f"token:{token.token_id}", "host_enrolled", host_id, detail))
    config = host_config(storage, host_id)
    return EnrollResponse(credential=credential, **config.model_dump())


def add_auditor_key(
    storage: Storage, text: str, comment: str, now: datetime, *, actor: str
) -> AuditorKey:
    try:
        pub = AuditorPublicKey.from_text(text.encode())
    except KeyFileError as exc:
        raise UnprocessableError(str(exc), code="invalid_key") from exc
    key = AuditorKey(pub.kid, pub.raw, _comment(comment), now)
    if storage.add_auditor_key(key):
        storage.audit(AuditEvent(now, actor, "auditor_key_added", key.kid, {"comment": comment}))
    return key


def remove_auditor_key(storage: Storage, kid: str, now: datetime, *, actor: str) -> None:
    if not storage.remove_auditor_key(kid):
        raise NotFoundError(f"no auditor key {kid}", code="unknown_key")
    storage.audit(AuditEvent(now, actor, "auditor_key_removed", kid))


def parse_ca_line(line: str, now: datetime) -> CaKey:
    """An OpenSSH public key line, ``type base64 [comment]`` (sshd(8) AUTHORIZED_KEYS FILE
    FORMAT, without options, as TrustedUserCAKeys takes it)."""
    parts = line.strip().split(None, 2)
    if len(parts) < 2 or parts[0] not in _CA_TYPES:
        raise UnprocessableError(
            "not an OpenSSH public key line (type base64 [comment]) of a known key type",
            code="invalid_key",
        )
    kind, b64 = parts[0], parts[1]
    comment = _comment(parts[2] if len(parts) == 3 else "")
    try:
        blob = base64.b64decode(b64, validate=True)
        (n,) = _U32.unpack_from(blob, 0)
        if blob[4 : 4 + n] != kind.encode():
            raise ValueError("the key blob's type is not the line's")
        if not kind.startswith("sk-"):  # cryptography does not load security-key types
            load_ssh_public_key(f"{kind} {b64}".encode())
    except (binascii.Error, ValueError, struct.error, TypeError):
        raise UnprocessableError("the public key does not parse", code="invalid_key") from None
    normalized = f"{kind} {b64} {comment}".rstrip()
    return CaKey(hashlib.sha256(blob).hexdigest(), normalized, user_ca.fingerprint(blob), now)


def add_ca_key(storage: Storage, line: str, now: datetime, *, actor: str) -> CaKey:
    key = parse_ca_line(line, now)
    if storage.add_ca_key(key):
        detail = {"fingerprint": key.fingerprint}
        storage.audit(AuditEvent(now, actor, "ca_key_added", key.key_id, detail))
    return key


def remove_ca_key(storage: Storage, key_id: str, now: datetime, *, actor: str) -> None:
    if not storage.remove_ca_key(key_id):
        raise NotFoundError(f"no CA key {key_id}", code="unknown_key")
    storage.audit(AuditEvent(now, actor, "ca_key_removed", key_id))


def set_policy(storage: Storage, document: Mapping[str, Any], now: datetime, *, actor: str) -> int:
    try:
        check_json(dict(document), MAX_POLICY)
    except ValueError as exc:
        raise UnprocessableError(f"the policy {exc}", code="invalid_policy") from None
    parse_retention(document)  # a retention part the job could not apply is refused now
    user_ca.cert_policy(document)  # and so is a certificates/forwarding part the CA could not
    policy = storage.set_policy(document, now)
    storage.audit(AuditEvent(now, actor, "policy_set", "policy", {"version": policy.version}))
    return policy.version


def add_hold(
    storage: Storage,
    kind: HoldKind,
    value: str,
    reason: str,
    now: datetime,
    *,
    actor: str,
    random_bytes: RandomBytes = os.urandom,
) -> Hold:
    _hold_value(kind, value)
    hold = Hold(random_bytes(8).hex(), kind, value, _comment(reason), now, actor)
    storage.add_hold(hold)
    detail = {"kind": kind.value, "value": value, "reason": reason}
    storage.audit(AuditEvent(now, actor, "hold_added", hold.hold_id, detail))
    return hold


def _hold_value(kind: HoldKind, value: str) -> None:
    if kind is HoldKind.SESSION:
        ok = is_session_id(value)
    elif kind is HoldKind.TARGET:
        ok = is_host_id(value)
    else:
        ok = 0 < len(value) <= 320 and value.isprintable()
    if not ok:
        raise UnprocessableError(f"not a valid {kind.value} for a legal hold", code="invalid_hold")


def remove_hold(storage: Storage, hold_id: str, now: datetime, *, actor: str) -> None:
    if not storage.remove_hold(hold_id):
        raise NotFoundError(f"no legal hold {hold_id}", code="unknown_hold")
    storage.audit(AuditEvent(now, actor, "hold_removed", hold_id))
