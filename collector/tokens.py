"""Bearer tokens (notes/issue4.md "Roles and tokens"), sans-IO apart from the storage handed in.

A token is 32 random bytes shown once as ``sa_<kind>_<base64url without padding>``; kinds
are ``agent`` (a one-time enrollment token), ``host`` (a host's credential, made at
enrollment), ``auditor``, ``admin`` and ``user`` (a person, by email: ``sshaudit login``).

Invariants: only the SHA-256 of the whole token string is stored, so a database leak gives
no usable token and the kind in the prefix cannot be changed without changing the hash;
the stored and computed hashes are compared with :func:`hmac.compare_digest`; a token is
refused (401) when unknown, revoked, expired, or, for an enrollment token, already used;
error messages never quote the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Callable
from datetime import datetime, timedelta

from sshaudit.collector.problems import UnauthorizedError
from sshaudit.collector.storage import Storage, TokenKind, TokenRecord
from sshaudit.errors import UsageError

SECRET_LEN = 32
_TOKEN_RE = re.compile(r"sa_(agent|host|auditor|admin|user)_[A-Za-z0-9_-]{43}")
_TTL_RE = re.compile(r"([1-9][0-9]{0,6})([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_TTL = timedelta(days=3650)

# Enrollment tokens are for the next few hours of rolling out; people's tokens for a
# quarter or a month; host credentials do not expire (they are revoked with the host).
DEFAULT_TTL: dict[TokenKind, timedelta | None] = {
    TokenKind.AGENT: timedelta(days=1),
    TokenKind.AUDITOR: timedelta(days=90),
    TokenKind.ADMIN: timedelta(days=30),
    TokenKind.USER: timedelta(days=30),
    TokenKind.HOST: None,
}


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def looks_like_token(token: str) -> bool:
    return _TOKEN_RE.fullmatch(token) is not None


def new_token(
    kind: TokenKind,
    now: datetime,
    *,
    ttl: timedelta | None,
    comment: str = "",
    host_id: str | None = None,
    email: str | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> tuple[str, TokenRecord]:
    """A fresh token and the record to store (which holds its hash, never the token)."""
    secret = base64.urlsafe_b64encode(random_bytes(SECRET_LEN)).rstrip(b"=").decode()
    token = f"sa_{kind.value}_{secret}"
    record = TokenRecord(
        token_id=random_bytes(8).hex(),
        kind=kind,
        digest=token_digest(token),
        created_at=now,
        expires_at=None if ttl is None else now + ttl,
        host_id=host_id,
        comment=comment,
        email=email,
    )
    return token, record


def parse_ttl(text: str) -> timedelta | None:
    """``30d``, ``12h``, ``45m``, ``3600s``, ``2w``, or ``never``; at most ten years."""
    if text == "never":
        return None
    m = _TTL_RE.fullmatch(text)
    if m is None:
        raise UsageError(f"--ttl {text!r}: use a number and a unit s, m, h, d or w, or 'never'")
    ttl = timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    if ttl > MAX_TTL:
        raise UsageError(f"--ttl {text!r}: at most ten years")
    return ttl


def authenticate(storage: Storage, token: str, now: datetime) -> TokenRecord:
    """The stored record of a valid token, or :class:`UnauthorizedError`."""
    if not looks_like_token(token):
        raise UnauthorizedError("not an sshaudit token", code="invalid_token")
    digest = token_digest(token)
    record = storage.token_by_digest(digest)
    if record is None or not hmac.compare_digest(record.digest, digest):
        raise UnauthorizedError("unknown token", code="invalid_token")
    if record.revoked_at is not None:
        raise UnauthorizedError("this token was revoked", code="token_revoked")
    if record.expires_at is not None and now >= record.expires_at:
        raise UnauthorizedError("this token has expired", code="token_expired")
    if record.kind is TokenKind.AGENT and record.used_at is not None:
        raise UnauthorizedError("this enrollment token was already used", code="token_used")
    return record


def token_state(record: TokenRecord, now: datetime) -> str:
    """For listings: active, revoked, expired or used."""
    if record.revoked_at is not None:
        return "revoked"
    if record.kind is TokenKind.AGENT and record.used_at is not None:
        return "used"
    if record.expires_at is not None and now >= record.expires_at:
        return "expired"
    return "active"
