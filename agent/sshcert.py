"""OpenSSH user certificates and the ``SSH_USER_AUTH`` file, sans-IO.

With ``ExposeAuthInfo yes`` (sshd_config(5)) sshd gives every session a file naming the
methods that authenticated it, one per line, e.g.
``publickey ssh-ed25519-cert-v01@openssh.com AAAA...``. For a certificate the key id is the
user's identity (normally their email), with a serial and the principals.

The certificate layout is OpenSSH's PROTOCOL.certkeys; strings and mpints are RFC 4251
section 5 ``string`` values (u32 length + bytes). Fingerprints are OpenSSH's
``SHA256:<base64 without padding>`` over the plain public key blob (for a certificate, the
certified key without its certificate parts, as ssh-keygen -l and sshd's log show it).

Invariants: any input, however malformed, gives a value or :class:`FormatError`, never another
exception; every length is checked against what is left before it is used; nothing here
verifies the CA signature (sshd already did, before the session existed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from sshaudit.agent.principals_policy import CERT_TYPES
from sshaudit.errors import FormatError

MAX_AUTH_INFO = 64 * 1024
MAX_PRINCIPALS = 256
USER_CERT = 1
HOST_CERT = 2

# certificate key type -> (plain key type, number of key-specific fields): PROTOCOL.certkeys
_CERT_TYPES = CERT_TYPES
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def fingerprint(blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _string(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self._data) - self._pos:
            raise FormatError(f"certificate: {what} runs past the end")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack(self.take(8, what))[0])

    def string(self, what: str) -> bytes:
        return self.take(self.u32(f"{what} length"), what)

    def text(self, what: str) -> str:
        try:
            return self.string(what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"certificate: {what} is not UTF-8") from exc

    @property
    def rest(self) -> int:
        return len(self._data) - self._pos


@dataclass(frozen=True)
class Certificate:
    """The fields of an OpenSSH certificate an audit record needs."""

    key_type: str  # e.g. ssh-ed25519-cert-v01@openssh.com
    serial: int
    cert_type: int  # 1 user, 2 host
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    fingerprint: str  # of the certified key (plain blob), as sshd logs it
    ca_fingerprint: str  # of the signing CA key


def parse_certificate(blob: bytes) -> Certificate:
    """Parse a certificate blob (PROTOCOL.certkeys); the signature is not checked."""
    r = _Reader(blob)
    key_type = r.text("key type")
    if key_type not in _CERT_TYPES:
        raise FormatError(f"certificate: unknown key type {key_type[:64]!r}")
    plain_type, n_fields = _CERT_TYPES[key_type]
    r.string("nonce")
    fields = [r.string(f"public key field {i}") for i in range(n_fields)]
    plain = _string(plain_type.encode()) + b"".join(_string(f) for f in fields)
    serial = r.u64("serial")
    cert_type = r.u32("certificate type")
    if cert_type not in (USER_CERT, HOST_CERT):
        raise FormatError(f"certificate: unknown certificate type {cert_type}")
    key_id = r.text("key id")
    principals = _principals(r.string("valid principals"))
    valid_after, valid_before = r.u64("valid after"), r.u64("valid before")
    for what in ("critical options", "extensions", "reserved"):
        r.string(what)
    ca_key = r.string("signature key")
    r.string("signature")
    if r.rest:
        raise FormatError(f"certificate: {r.rest} bytes after the signature")
    if not ca_key:
        raise FormatError("certificate: empty signature key")
    return Certificate(
        key_type=key_type,
        serial=serial,
        cert_type=cert_type,
        key_id=key_id,
        principals=principals,
        valid_after=valid_after,
        valid_before=valid_before,
        fingerprint=fingerprint(plain),
        ca_fingerprint=fingerprint(ca_key),
    )


def _principals(data: bytes) -> tuple[str, ...]:
    r = _Reader(data)
    out: list[str] = []
    while r.rest:
        if len(out) >= MAX_PRINCIPALS:
            raise FormatError(f"certificate: more than {MAX_PRINCIPALS} principals")
        out.append(r.text("principal"))
    return tuple(out)


@dataclass(frozen=True)
class AuthInfo:
    """The public key that authenticated the session, from ``SSH_USER_AUTH``."""

    key_type: str
    key_fingerprint: str  # of the plain public key (for a certificate: the certified key)
    certificate: Certificate | None

    @property
    def user_email(self) -> str:
        """The certificate's key id (DESIGN.md: the user's identity), or empty."""
        return self.certificate.key_id if self.certificate else ""

    def principal_for(self, unix_user: str) -> str:
        """The principal that most plausibly let ``unix_user`` in: the user's own name,
        else an ``user@domain`` principal (the email-prefix rule), else the first one."""
        if self.certificate is None or not self.certificate.principals:
            return ""
        names = self.certificate.principals
        if unix_user in names:
            return unix_user
        for name in names:
            if name.partition("@")[0] == unix_user:
                return name
        return names[0]


def parse_user_auth(text: str) -> AuthInfo | None:
    """The last ``publickey`` method in an ``SSH_USER_AUTH`` file, or None when the session
    was authenticated otherwise (password, keyboard-interactive: no key to name)."""
    if len(text) > MAX_AUTH_INFO:
        raise FormatError("SSH_USER_AUTH: larger than 64 KiB")
    found: AuthInfo | None = None
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "publickey":
            continue
        try:
            blob = base64.b64decode(words[2], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FormatError("SSH_USER_AUTH: the public key is not base64") from exc
        if words[1] not in _CERT_TYPES:
            found = AuthInfo(words[1], fingerprint(blob), None)
            continue
        cert = parse_certificate(blob)
        if cert.key_type != words[1]:
            raise FormatError("SSH_USER_AUTH: the key type does not match the certificate")
        found = AuthInfo(words[1], cert.fingerprint, cert)
    return found
