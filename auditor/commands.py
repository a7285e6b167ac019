"""What each ``sshaudit`` subcommand does, apart from parsing its arguments.

Invariants: outputs are written atomically (auditor/files.py); a sealed input is verified
whole before its plaintext is used; a truncated recording is cut at its last complete line
before it is parsed, so what was recorded up to the cut is still shown.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sshaudit.asciicast import Code, Decoder, Event, Header, decode_all
from sshaudit.auditor.files import (
    Policy,
    Source,
    atomic_output,
    decrypt_bytes,
    decrypt_to,
    load_private_key,
    load_public_key,
    load_raw_key,
    open_sink,
    verify,
)
from sshaudit.errors import SealedFormatError, UsageError
from sshaudit.keys import AuditorPrivateKey, encode_key_text
from sshaudit.sealed import MAGIC, MAX_HEADER, Completeness, ReadResult, SealedWriter, parse_header

Warn = Callable[[str], object]


def keygen(path: str, *, force: bool) -> None:
    key = AuditorPrivateKey.generate()
    pub_path = f"{path}.pub"
    if not force:
        for p in (path, pub_path):
            if Path(p).exists():
                raise UsageError(f"{p} exists; pass --force to overwrite it")
    with atomic_output(path, 0o600) as out:
        out.write(encode_key_text(key.raw))
    with atomic_output(pub_path, 0o644) as out:
        out.write(encode_key_text(key.public.raw))


@dataclass(frozen=True)
class SealRequest:
    input: str
    output: str
    recipients: tuple[str, ...]
    sign: str | None
    session_id: str | None
    host_id: str | None
    frame_size: int
    now: datetime
    new_id: Callable[[], str]


def _writer_for(request: SealRequest, header: Header) -> SealedWriter:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    meta = header.extra.get("sshaudit")
    meta = meta if isinstance(meta, dict) else {}
    session_id = request.session_id or _str(meta.get("session_id")) or request.new_id()
    host_id = request.host_id or _str(meta.get("target_id")) or "imported"
    created = request.now
    if header.timestamp is not None:
        with contextlib.suppress(OverflowError, OSError, ValueError):
            created = datetime.fromtimestamp(header.timestamp, UTC)
    signer = None
    if request.sign:
        signer = Ed25519PrivateKey.from_private_bytes(load_raw_key(request.sign, "host key"))
    return SealedWriter(
        recipients=[load_public_key(p) for p in request.recipients],
        session_id=session_id,
        host_id=host_id,
        created_at=created,
        host_key=signer,
    )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def seal(request: SealRequest) -> int:
    """Validate IN as asciicast v2 while sealing it; returns the number of frames."""
    source = Source(request.input)
    decoder = Decoder()
    writer: SealedWriter | None = None
    pending = bytearray()
    with atomic_output(request.output, 0o644) as out:
        for chunk in source.chunks():
            decoder.feed(chunk)
            pending += chunk
            if writer is None and decoder.header is not None:
                writer = _writer_for(request, decoder.header)
                out.write(writer.start())
            while writer is not None and len(pending) > request.frame_size:
                out.write(writer.write(bytes(pending[: request.frame_size])))
                del pending[: request.frame_size]
        decoder.close()
        if writer is None:
            assert decoder.header is not None  # close() raised otherwise
            writer = _writer_for(request, decoder.header)
            out.write(writer.start())
        out.write(writer.close(bytes(pending)))
    return writer.frames


def _keys(paths: Sequence[str] | None, warn: Warn) -> list[AuditorPrivateKey]:
    if not paths:
        raise UsageError("this recording is sealed: give an auditor private key with --key")
    return [load_private_key(p, warn) for p in paths]


def _sealed_source(path: str) -> Source:
    source = Source(path)
    if not source.is_sealed():
        raise SealedFormatError(f"{path}: not a sealed recording (no SSHAUDIT magic)")
    return source


def decrypt(
    path: str, output: str | None, key_paths: Sequence[str], policy: Policy, warn: Warn
) -> ReadResult:
    source = _sealed_source(path)
    keys = _keys(key_paths, warn)
    verify(source, keys, policy)
    with open_sink(output) as out:
        return decrypt_to(source, keys, out.write)


def info(path: str) -> dict[str, Any]:
    source = _sealed_source(path)
    head = b""
    for chunk in source.chunks():
        head += chunk
        if len(head) >= len(MAGIC) + 4 + MAX_HEADER:
            break
    if len(head) < len(MAGIC) + 4:
        raise SealedFormatError(f"{path}: file ends inside the header")
    (size,) = struct.unpack(">I", head[len(MAGIC) : len(MAGIC) + 4])
    raw = head[len(MAGIC) + 4 : len(MAGIC) + 4 + size]
    if size > MAX_HEADER or len(raw) < size:
        raise SealedFormatError(f"{path}: header length {size} is out of range or cut short")
    return dict(parse_header(raw).fields)


def _plaintext(path: str, key_paths: Sequence[str] | None, policy: Policy, warn: Warn) -> bytes:
    source = Source(path)
    if not source.is_sealed():
        return source.read_all()
    plain, result = decrypt_bytes(source, _keys(key_paths, warn), policy)
    if result.completeness is Completeness.TRUNCATED:
        warn(f"warning: {path} is truncated after {result.frames} frames; showing what is there")
        plain = plain[: plain.rfind(b"\n") + 1]
    return plain


def load_events(
    path: str, key_paths: Sequence[str] | None, policy: Policy, warn: Warn
) -> tuple[Header, list[Event]]:
    return decode_all(_plaintext(path, key_paths, policy, warn))


def export(
    path: str,
    output: str | None,
    fmt: str,
    key_paths: Sequence[str] | None,
    policy: Policy,
    warn: Warn,
) -> None:
    from sshaudit.termsafe import Stripper

    plain = _plaintext(path, key_paths, policy, warn)
    _header, events = decode_all(plain)  # validates even when exporting as cast
    if fmt == "cast":
        data = plain
    else:
        stripper = Stripper()
        text = [stripper.feed(e.data) for e in events if e.code is Code.OUTPUT]
        data = ("".join(text) + stripper.flush()).encode()
    with open_sink(output) as out:
        out.write(data)
