"""``POST /v1/certificates``: the built-in user CA signs a short-lived OpenSSH user
certificate for the caller's public key (``sshaudit login``).

Who may ask: a ``user`` token only. Its email is the identity the certificate states (key
id = the email, principal = its local part plus the policy's extras); an admin token has no
email, and the way for an admin to get a certificate is a user token of their own (made
with ``token create --role user --email ...``, which the audit log records), so one token
kind means one identity and an admin token never mints certificates for arbitrary names.

Invariants: the CA key is read from its file at every request, so ``ca init --rotate``
takes effect at once without a restart; every issued certificate is in the audit log
(action ``certificate_issued``: token, email, serial, principals, validity, the certified
key's and the CA's fingerprints) before the answer is sent; nothing here is stored but that.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from sshaudit.collector import user_ca
from sshaudit.collector.deps import Ctx, UserToken, actor
from sshaudit.collector.models import ErrorBody, format_time
from sshaudit.collector.problems import ForbiddenError
from sshaudit.collector.storage import AuditEvent
from sshaudit.collector.user_ca_store import load_signer

router = APIRouter(tags=["users"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 409, 413, 415, 422, 500)
}
TEN_YEARS = 10 * 365 * 86400


class CertificateRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    public_key: Annotated[str, Field(min_length=1, max_length=user_ca.MAX_KEY_LINE, strict=True)]
    ttl_seconds: Annotated[int | None, Field(ge=1, le=TEN_YEARS, strict=True)] = Field(
        default=None,
        description=f"lifetime wanted; default {user_ca.DEFAULT_TTL} (or the policy's "
        f"certificates.default_ttl_seconds), clamped to {user_ca.MIN_TTL}..{user_ca.MAX_TTL} "
        "and to the policy's certificates.max_ttl_seconds",
    )


class CertificateOut(BaseModel):
    certificate: str = Field(description="one OpenSSH certificate line, for <key>-cert.pub")
    serial: int = Field(ge=1, le=(1 << 64) - 1)
    key_id: str
    principals: list[str]
    extensions: list[str]
    valid_after: str
    valid_before: str
    ca_fingerprint: str


@router.post("/v1/certificates", responses=_ERRORS)
def issue_certificate(ctx: Ctx, token: UserToken, body: CertificateRequest) -> CertificateOut:
    """Sign an OpenSSH user certificate for ``public_key`` (Ed25519, ECDSA or RSA of at
    least 3072 bits) with the collector's user CA: key id = the token's email, principals =
    its local part plus the policy's ``certificates.extra_principals``, valid from 60 s ago
    for ``ttl_seconds`` (clamped). 409 ``no_user_ca`` until ``sshaudit-collector ca init``."""
    if token.email is None:  # made before user tokens needed one: refuse, do not guess
        raise ForbiddenError("this user token names no email", code="no_identity")
    signer = load_signer(ctx.user_ca_key)
    key = user_ca.parse_user_key(body.public_key)
    policy = user_ca.cert_policy(ctx.storage.get_policy().document)
    now = ctx.clock()
    issued = user_ca.issue(
        signer, key, token.email, policy, now, ttl=body.ttl_seconds, random_bytes=ctx.random_bytes
    )
    ca_line = user_ca.public_line(signer.public_key(), "")
    ca_fingerprint = user_ca.fingerprint_line(ca_line)
    detail = {
        "email": issued.key_id,
        "serial": issued.serial,
        "principals": list(issued.principals),
        "key_fingerprint": issued.key_fingerprint,
        "ca_fingerprint": ca_fingerprint,
        "valid_after": format_time(issued.valid_after),
        "valid_before": format_time(issued.valid_before),
    }
    ctx.storage.audit(
        AuditEvent(now, actor(token), "certificate_issued", str(issued.serial), detail)
    )
    return CertificateOut(
        certificate=issued.certificate,
        serial=issued.serial,
        key_id=issued.key_id,
        principals=list(issued.principals),
        extensions=list(issued.extensions),
        valid_after=format_time(issued.valid_after),
        valid_before=format_time(issued.valid_before),
        ca_fingerprint=ca_fingerprint,
    )
