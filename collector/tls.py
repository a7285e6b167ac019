"""The collector's TLS certificate and its fingerprint (what agents and auditors pin).

The fingerprint is ``SHA256:`` followed by the 64 lowercase hex digits of SHA-256 over the
certificate's DER encoding: the same digest ``openssl x509 -noout -fingerprint -sha256``
prints (there as uppercase pairs joined by colons, which :func:`parse_fingerprint` accepts
too). Hex rather than base64 so that it can be compared with openssl's output by eye.

Invariants: the private key is written 0600 (never readable by anyone but the collector's
user); the self-signed certificate is ECDSA P-256 (every TLS client speaks it), valid for
the names and addresses given (subjectAltName, RFC 5280 section 4.2.1.6); since clients pin
it, its validity period is long and its issuer is itself.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sshaudit.errors import UsageError

VALIDITY = timedelta(days=3650)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def fingerprint_der(der: bytes) -> str:
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def fingerprint_pem(pem: bytes) -> str:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise UsageError("not a PEM certificate") from exc
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def parse_fingerprint(text: str) -> str:
    """The 64 lowercase hex digits of a fingerprint written ``SHA256:<hex>``, bare hex, or
    openssl's ``AB:CD:...`` form (optionally after ``sha256 Fingerprint=``)."""
    value = text.strip()
    for prefix in ("sha256 fingerprint=", "sha256:"):
        if value.lower().startswith(prefix):
            value = value[len(prefix) :]
    value = value.replace(":", "").lower()
    if not _HEX64.fullmatch(value):
        raise UsageError(
            "a certificate fingerprint is SHA256: and 64 hex digits "
            "(as `sshaudit-collector init` prints it)"
        )
    return value


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # keep order, drop duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def self_signed(names: Sequence[str], now: datetime) -> tuple[bytes, bytes]:
    """A new P-256 key and a self-signed certificate for ``names``: (cert PEM, key PEM)."""
    if not names:
        raise UsageError("a certificate needs at least one name")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + VALIDITY)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
