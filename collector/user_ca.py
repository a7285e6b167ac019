"""The built-in SSH user CA, sans-IO: check a user's public key, read the policy's
``certificates`` and ``forwarding`` parts, and build and sign an OpenSSH user certificate
(PROTOCOL.certkeys) with cryptography's SSHCertificateBuilder.

Invariants:
- the key id is the user's email and the principals are its local part (DESIGN.md
  "Identity": the email-prefix rule) followed by the policy's ``extra_principals``; no
  certificate is ever valid for all principals (an empty list means that to sshd);
- validity starts ``BACKDATE`` seconds before ``now`` (a host clock a little behind still
  accepts it) and lasts the requested TTL clamped to ``MIN_TTL``..``MAX_TTL``, narrowed by
  the policy's ``max_ttl_seconds``; the serial is a random non-zero u64 (serial 0 cannot
  be told apart from "no serial" in a KRL, ssh-keygen(1) KEY REVOCATION LISTS);
- extensions: ``permit-pty`` always; ``permit-port-forwarding``, ``permit-agent-forwarding``
  and ``permit-X11-forwarding`` only when the policy's ``forwarding`` allows them, so a host
  whose sshd allows more still cannot be used beyond the policy; never ``permit-user-rc``
  (~/.ssh/rc runs before the ForceCommand recorder, unrecorded: docs/sshd-setup.md);
  no critical options;
- user keys: Ed25519, ECDSA (NIST P-256/384/521) or RSA of at least 3072 bits (NIST SP
  800-57 part 1: 128-bit security); DSA, short RSA, certificates and security-key types
  are refused with a message that says why.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    SSHCertificateBuilder,
    SSHCertificateType,
    load_ssh_public_key,
)

from sshaudit.collector.problems import UnprocessableError

MIN_TTL = 5 * 60
MAX_TTL = 24 * 3600
DEFAULT_TTL = 8 * 3600
BACKDATE = 60  # seconds of clock skew a host may have behind the collector
MAX_EXTRA_PRINCIPALS = 32
MIN_RSA_BITS = 3072
MAX_KEY_LINE = 16384

_LOCAL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PRINCIPAL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}")  # no comma, space or glob
_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
    }
)
# policy "forwarding" key -> certificate extension (PROTOCOL.certkeys "Extensions"); sshd
# gates streamlocal (Unix socket) forwarding on permit-port-forwarding as well.
_FORWARDING = (
    ("tcp", "permit-port-forwarding"),
    ("streamlocal", "permit-port-forwarding"),
    ("agent", "permit-agent-forwarding"),
    ("x11", "permit-X11-forwarding"),
)
_U32 = struct.Struct(">I")

UserKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
RandomBytes = Callable[[int], bytes]


def check_email(email: str) -> str:
    """``local@domain``: the local part is a valid principal and unix user name (letters,
    digits, ``._-``, not starting with ``.`` or ``-``, at most 64), the domain DNS labels."""
    local, at, domain = email.partition("@")
    labels = domain.split(".")
    ok = (
        at == "@"
        and len(email) <= 254
        and _LOCAL_RE.fullmatch(local) is not None
        and all(_LABEL_RE.fullmatch(label) for label in labels)
    )
    if not ok:
        raise UnprocessableError(
            f"{email[:80]!r} is not an email address this CA certifies: name@domain, the name "
            "of letters, digits, '.', '_' or '-' (it becomes the certificate's principal)",
            code="invalid_email",
        )
    return email


def principal_of(email: str) -> str:
    """The email prefix rule: ``jdoe@example.com`` -> ``jdoe``."""
    return check_email(email).partition("@")[0]


@dataclass(frozen=True)
class CertPolicy:
    """The parts of the policy document (notes/issue5.md) the CA applies."""

    default_ttl: int = DEFAULT_TTL
    max_ttl: int = MAX_TTL
    extra_principals: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ("permit-pty",)

    def ttl(self, requested: int | None) -> int:
        """The requested (or default) lifetime, clamped to MIN_TTL..max_ttl."""
        want = self.default_ttl if requested is None else requested
        return max(MIN_TTL, min(want, self.max_ttl))


def _seconds(doc: Mapping[str, Any], key: str, default: int) -> int:
    value = doc.get(key, default)
    if type(value) is not int or not MIN_TTL <= value <= MAX_TTL:
        raise UnprocessableError(
            f"the policy's certificates.{key} must be a whole number of seconds, "
            f"{MIN_TTL} to {MAX_TTL}",
            code="invalid_policy",
        )
    return value


def _section(document: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = document.get(name, {})
    if not isinstance(section, Mapping):
        raise UnprocessableError(f"the policy's {name} must be an object", code="invalid_policy")
    return section


def cert_policy(document: Mapping[str, Any]) -> CertPolicy:
    """The CA's reading of a policy document; :class:`UnprocessableError` when invalid
    (admin.set_policy refuses such a document up front)."""
    certs = _section(document, "certificates")
    max_ttl = _seconds(certs, "max_ttl_seconds", MAX_TTL)
    default_ttl = min(_seconds(certs, "default_ttl_seconds", DEFAULT_TTL), max_ttl)
    extra = certs.get("extra_principals", [])
    if (
        not isinstance(extra, list)
        or len(extra) > MAX_EXTRA_PRINCIPALS
        or not all(isinstance(p, str) and _PRINCIPAL_RE.fullmatch(p) for p in extra)
    ):
        raise UnprocessableError(
            f"the policy's certificates.extra_principals must be a list of at most "
            f"{MAX_EXTRA_PRINCIPALS} names of letters, digits, '.', '_', '@' or '-'",
            code="invalid_policy",
        )
    forwarding = _section(document, "forwarding")
    for key, value in forwarding.items():
        if not isinstance(value, bool):
            raise UnprocessableError(
                f"the policy's forwarding.{key} must be true or false", code="invalid_policy"
            )
    allowed = {ext for key, ext in _FORWARDING if forwarding.get(key) is True}
    return CertPolicy(
        default_ttl=default_ttl,
        max_ttl=max_ttl,
        extra_principals=tuple(dict.fromkeys(extra)),
        extensions=tuple(sorted({"permit-pty", *allowed})),
    )


@dataclass(frozen=True)
class PublicKey:
    key: UserKey
    kind: str  # the line's key type, e.g. ssh-ed25519
    fingerprint: str  # OpenSSH style SHA256:<base64 without padding> of the key blob


def fingerprint(blob: bytes) -> str:
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def fingerprint_line(line: str) -> str:
    """The fingerprint of a well-formed public key line's blob."""
    return fingerprint(base64.b64decode(line.split()[1]))


def parse_user_key(line: str) -> PublicKey:
    """An OpenSSH public key line (``type base64 [comment]``, as ``ssh-keygen`` writes
    ``id_*.pub``) of an accepted type and size."""
    parts = line.strip().split(None, 2)
    if len(line) > MAX_KEY_LINE or len(parts) < 2:
        raise _bad_key("not an OpenSSH public key line (type base64 [comment])")
    kind, b64 = parts[0], parts[1]
    if kind == "ssh-dss":
        raise _bad_key("DSA keys are refused (OpenSSH disabled them): use ssh-keygen -t ed25519")
    if "-cert-v01@openssh.com" in kind:
        raise _bad_key("that is a certificate; send the public key (the .pub file) instead")
    if kind not in _KEY_TYPES:
        raise _bad_key(f"key type {kind[:40]!r} is not accepted: use Ed25519, ECDSA or RSA")
    try:
        blob = base64.b64decode(b64, validate=True)
        (n,) = _U32.unpack_from(blob, 0)
        if blob[4 : 4 + n] != kind.encode():
            raise ValueError("the key blob's type is not the line's")
        key = load_ssh_public_key(f"{kind} {b64}".encode())
    except (binascii.Error, ValueError, struct.error, TypeError):
        raise _bad_key("the public key does not parse") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise _bad_key("the public key does not parse")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise UnprocessableError(
            f"a {key.key_size}-bit RSA key is too short: at least {MIN_RSA_BITS} bits, "
            "or better ssh-keygen -t ed25519",
            code="weak_key",
        )
    return PublicKey(key, kind, fingerprint(blob))


def _bad_key(message: str) -> UnprocessableError:
    return UnprocessableError(message, code="invalid_key")


@dataclass(frozen=True)
class Issued:
    certificate: str  # one OpenSSH line: "<type>-cert-v01@openssh.com base64 key_id"
    serial: int
    key_id: str
    principals: tuple[str, ...]
    extensions: tuple[str, ...]
    valid_after: datetime
    valid_before: datetime
    key_fingerprint: str  # of the certified (user) key


def new_serial(random_bytes: RandomBytes) -> int:
    while True:
        serial = int.from_bytes(random_bytes(8), "big")
        if serial:
            return serial


def issue(
    ca: ed25519.Ed25519PrivateKey,
    user_key: PublicKey,
    email: str,
    policy: CertPolicy,
    now: datetime,
    *,
    ttl: int | None,
    random_bytes: RandomBytes,
) -> Issued:
    """Sign a user certificate for ``user_key`` (see the module invariants)."""
    principals = tuple(dict.fromkeys([principal_of(email), *policy.extra_principals]))
    start = int(now.timestamp()) - BACKDATE
    after = datetime.fromtimestamp(start, now.tzinfo)
    before = datetime.fromtimestamp(int(now.timestamp()) + policy.ttl(ttl), now.tzinfo)
    serial = new_serial(random_bytes)
    builder = (
        SSHCertificateBuilder()
        .public_key(user_key.key)
        .type(SSHCertificateType.USER)
        .serial(serial)
        .key_id(email.encode())
        .valid_principals([p.encode() for p in principals])
        .valid_after(start)
        .valid_before(int(before.timestamp()))
    )
    for name in policy.extensions:
        builder = builder.add_extension(name.encode(), b"")
    cert = builder.sign(ca)
    line = cert.public_bytes().decode() + " " + email
    return Issued(
        certificate=line,
        serial=serial,
        key_id=email,
        principals=principals,
        extensions=policy.extensions,
        valid_after=after,
        valid_before=before,
        key_fingerprint=user_key.fingerprint,
    )


def public_line(ca: ed25519.Ed25519PublicKey, comment: str) -> str:
    """``ssh-ed25519 base64 comment``, as TrustedUserCAKeys takes it."""
    text = ca.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return f"{text} {comment}".rstrip()
