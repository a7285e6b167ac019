"""Key encodings (FORMAT.md "Keys"), sans-IO: text or bytes in, key objects out.

Auditor keys are X25519; a key file holds the 32 raw key bytes in standard base64 with
padding, optionally followed by one newline, and nothing else (the ``ssh-log-cli
generate-key-pair`` encoding). Host signing keys are Ed25519 in the same encoding.
Error messages name the file's role, never its content: key material never reaches a log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from sshaudit.errors import KeyFileError

RAW_KEY_LEN = 32
_MAX_KEY_FILE = 64  # 44 base64 characters + newline; anything longer is not a key file


def decode_key_text(data: bytes, what: str) -> bytes:
    """Decode a key file's content to its 32 raw bytes, strictly."""
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{what}: not a key file (too long)")
    text = data[:-1] if data.endswith(b"\n") else data
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"{what}: not base64 of a 32-byte key") from exc
    if len(raw) != RAW_KEY_LEN or base64.b64encode(raw) != text:
        raise KeyFileError(f"{what}: not base64 of a 32-byte key")
    return raw


def encode_key_text(raw: bytes) -> bytes:
    """The key file content for 32 raw key bytes (with a trailing newline)."""
    if len(raw) != RAW_KEY_LEN:
        raise ValueError("a raw key is 32 bytes")
    return base64.b64encode(raw) + b"\n"


def key_id(public_raw: bytes) -> str:
    """FORMAT.md: the first 8 bytes of SHA-256 over the raw public key, lowercase hex."""
    return hashlib.sha256(public_raw).digest()[:8].hex()


@dataclass(frozen=True)
class AuditorPublicKey:
    """An auditor's X25519 public key and its key id."""

    raw: bytes

    @property
    def kid(self) -> str:
        return key_id(self.raw)

    @classmethod
    def from_text(cls, data: bytes, what: str = "auditor public key") -> AuditorPublicKey:
        return cls(decode_key_text(data, what))


@dataclass(frozen=True)
class AuditorPrivateKey:
    """An auditor's X25519 private key; ``public`` is derived from it."""

    raw: bytes

    def __repr__(self) -> str:  # never print key material, even by accident
        return f"AuditorPrivateKey(kid={self.public.kid})"

    @property
    def public(self) -> AuditorPublicKey:
        pub = X25519PrivateKey.from_private_bytes(self.raw).public_key().public_bytes_raw()
        return AuditorPublicKey(pub)

    @classmethod
    def from_text(cls, data: bytes, what: str = "auditor private key") -> AuditorPrivateKey:
        return cls(decode_key_text(data, what))

    @classmethod
    def generate(cls) -> AuditorPrivateKey:
        return cls(X25519PrivateKey.generate().private_bytes_raw())


def x25519_public(raw: bytes) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(raw)


def ed25519_private_from_text(data: bytes, what: str = "host key") -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(decode_key_text(data, what))


def ed25519_public_from_text(data: bytes, what: str = "host public key") -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(decode_key_text(data, what))


def ed25519_private_text(key: Ed25519PrivateKey) -> bytes:
    return encode_key_text(key.private_bytes_raw())


def ed25519_public_text(key: Ed25519PublicKey) -> bytes:
    return encode_key_text(key.public_bytes_raw())
