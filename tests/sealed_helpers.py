"""Shared helpers for the sealed-format tests (test_sealed*.py): vectors, keys, I/O."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import independent_format as ind
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sshaudit.keys import AuditorPrivateKey, AuditorPublicKey
from sshaudit.sealed import ReadResult, SealedReader, SealedWriter

VECTORS = Path(__file__).parent / "vectors"


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


KEY1 = AuditorPrivateKey.from_text(vector("auditor1.key"))
KEY2 = AuditorPrivateKey.from_text(vector("auditor2.key"))
CAST = vector("session.cast")
HOST_PUB = base64.b64decode(vector("host.ed25519.pub"), validate=True)
SESSION = "0b9f8c1e-3a52-4d7e-9c61-2f4d8e7a1b00"
WHEN = datetime(2026, 11, 22, 1, 2, 3, tzinfo=UTC)


def read(
    data: bytes, keys: Sequence[AuditorPrivateKey], chunks: Sequence[int] = ()
) -> tuple[bytes, ReadResult]:
    """Feed ``data`` to a project reader in pieces of the given sizes, then the rest."""
    reader = SealedReader(keys)
    out, pos = [], 0
    for size in chunks:
        out.append(reader.feed(data[pos : pos + size]))
        pos += size
    out.append(reader.feed(data[pos:]))
    return b"".join(out), reader.finish()


def project_file(
    pieces: Sequence[bytes],
    recipients: Sequence[bytes],
    signing: bytes | None,
    *,
    close: bool = True,
) -> bytes:
    writer = SealedWriter(
        recipients=[AuditorPublicKey(r) for r in recipients],
        session_id=SESSION,
        host_id="web-1",
        created_at=WHEN,
        host_key=None if signing is None else Ed25519PrivateKey.from_private_bytes(signing),
    )
    out = writer.start() + b"".join(writer.write(p) for p in pieces)
    return out + writer.close() if close else out


def secret_texts(*raws: bytes) -> list[str]:
    return [t for raw in raws for t in (ind.b64(raw), raw.hex(), ind.b64(raw).rstrip("="))]


def messages(exc: BaseException | None) -> str:
    """Everything a log could show of ``exc``: its text, repr and its whole chain."""
    out = []
    while exc is not None:
        out += [str(exc), repr(exc)]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)
