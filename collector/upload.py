"""The upload protocol's checks, sans-IO (notes/issue4.md "Upload protocol"), shared by the
collector (which checks) and the agent's shipper (which cuts its spool files the same way).

A sealed recording (FORMAT.md) travels as byte ranges of the file as stored:
- the *prefix*: magic, u32 header length, header, exactly (``PUT .../recording``);
- *chunks*: whole frames (u32 length + ciphertext, ``16 <= len <= 1 MiB + 16``), the last
  chunk optionally ending with the signature trailer (``POST .../recording?offset=N``).

Invariants:
- every length field is bounded before it is trusted, and a chunk is accepted only if it
  parses as whole frames, optionally followed by one complete trailer at its very end;
- nothing here decrypts or needs a data key: the signature (FORMAT.md "Trailer") is Ed25519
  by the host key over SHA-256(header bytes || every frame byte as stored), which the
  collector recomputes from the stored bytes;
- a signature counts only against the key the collector enrolled for the host: the header's
  ``host_key`` must equal it (a valid signature by an unknown key proves nothing).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sshaudit.collector.problems import BadRequestError, ForbiddenError, UnprocessableError
from sshaudit.errors import SealedFormatError
from sshaudit.sealed import (
    MAGIC,
    MAX_FRAME,
    MAX_HEADER,
    MAX_TRAILER,
    TAG_LEN,
    TRAILER_MARK,
    SealedHeader,
    parse_header,
)

_U32 = struct.Struct(">I")
HEADER_START = len(MAGIC) + _U32.size  # the signed bytes start here: the header JSON
MAX_PREFIX = HEADER_START + MAX_HEADER
MIN_TRAILER = 2  # FORMAT.md bounds the trailer JSON to 2..64 KiB, as core/sealed.py reads it
SIGNATURE_LEN = 64  # Ed25519 (RFC 8032 section 5.1.6)


@dataclass(frozen=True)
class Prefix:
    """A parsed prefix; ``length`` is where the frames start in the file."""

    header: SealedHeader
    length: int


def parse_prefix(body: bytes) -> Prefix:
    """Check that ``body`` is exactly magic + header length + header, and parse the header."""
    if len(body) < HEADER_START or body[: len(MAGIC)] != MAGIC:
        raise BadRequestError(
            "the recording must start with the sealed format's magic and version",
            code="malformed_prefix",
        )
    (n,) = _U32.unpack_from(body, len(MAGIC))
    if not 2 <= n <= MAX_HEADER:
        raise BadRequestError(
            f"header length {n} out of range (2..{MAX_HEADER})", code="malformed_prefix"
        )
    if len(body) != HEADER_START + n:
        raise BadRequestError(
            f"the prefix must be exactly the magic, the header length and the {n}-byte header "
            f"({HEADER_START + n} bytes), not {len(body)} bytes",
            code="malformed_prefix",
        )
    try:
        header = parse_header(body[HEADER_START:])
    except SealedFormatError as exc:
        raise BadRequestError(str(exc), code="malformed_header") from exc
    return Prefix(header, len(body))


def check_header(header: SealedHeader, *, session_id: str, host_id: str, host_key: bytes) -> None:
    """The header must name this session and this host, and carry its enrolled key."""
    if header.host_id != host_id:
        raise ForbiddenError(
            "the recording's host_id is not the host this credential belongs to",
            code="foreign_session",
        )
    if header.session_id != session_id:
        raise UnprocessableError(
            "the recording's session_id does not match the URL", code="session_id_mismatch"
        )
    if header.host_key is None:
        raise UnprocessableError(
            "the recording is not signed (no host_key in its header); the collector accepts "
            "signed recordings only",
            code="unsigned_recording",
        )
    if header.host_key != host_key:
        raise UnprocessableError(
            "the recording's host_key is not this host's enrolled key", code="host_key_mismatch"
        )


@dataclass(frozen=True)
class ChunkScan:
    """What a chunk holds: ``frames`` whole frames in ``chunk[:frames_end]``, then the
    trailer's signature if the chunk ends with one."""

    frames: int
    frames_end: int
    signature: bytes | None


def _malformed(message: str) -> BadRequestError:
    return BadRequestError(message, code="malformed_chunk")


def scan_chunk(chunk: bytes | memoryview) -> ChunkScan:
    """Check that ``chunk`` is whole frames, optionally ending with a complete trailer."""
    view = memoryview(chunk)
    if not view:
        raise _malformed("empty chunk")
    pos = frames = 0
    while pos < len(view):
        if len(view) - pos < _U32.size:
            raise _malformed(f"the chunk ends inside the length of frame {frames}")
        (n,) = _U32.unpack_from(view, pos)
        if n == TRAILER_MARK:
            return ChunkScan(frames, pos, _trailer(view[pos + _U32.size :]))
        if not TAG_LEN <= n <= MAX_FRAME:
            raise _malformed(f"frame {frames} of the chunk: length {n} out of range")
        if len(view) - pos - _U32.size < n:
            raise _malformed(f"the chunk ends inside frame {frames} (whole frames only)")
        pos += _U32.size + n
        frames += 1
    return ChunkScan(frames, pos, None)


def _trailer(rest: memoryview) -> bytes:
    if len(rest) < _U32.size:
        raise _malformed("the chunk ends inside the signature trailer")
    (n,) = _U32.unpack_from(rest, 0)
    if not MIN_TRAILER <= n <= MAX_TRAILER:
        raise _malformed(f"signature trailer length {n} out of range")
    if len(rest) != _U32.size + n:
        raise _malformed("the signature trailer must be complete and end the chunk")
    return parse_trailer(bytes(rest[_U32.size :]))


def parse_trailer(doc: bytes) -> bytes:
    """The signature in a trailer's JSON ``{"alg": "Ed25519", "sig": "<base64>"}``."""
    try:
        parsed = json.loads(doc.decode("utf-8"))
        alg, sig_b64 = parsed["alg"], parsed["sig"]
        sig = base64.b64decode(sig_b64, validate=True)
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, binascii.Error, RecursionError):
        # json raises RecursionError, not ValueError, for deeply nested input.
        raise UnprocessableError(
            "the signature trailer is not valid", code="malformed_trailer"
        ) from None
    if alg != "Ed25519" or len(sig) != SIGNATURE_LEN:
        raise UnprocessableError(
            "the signature trailer is not an Ed25519 signature", code="malformed_trailer"
        )
    return sig


def signed_digest(pieces: Iterable[bytes | memoryview]) -> bytes:
    """SHA-256 over the signed bytes: the file from :data:`HEADER_START` to the trailer."""
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece)
    return h.digest()


def verify_signature(host_key: bytes, digest: bytes, signature: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(host_key).verify(signature, digest)
    except (InvalidSignature, ValueError):
        raise UnprocessableError(
            "the signature trailer does not verify with this host's enrolled key over the "
            "recording as stored: the recording was altered, reordered or cut",
            code="signature_invalid",
        ) from None


def plan_chunk(data: bytes | memoryview, limit: int) -> int:
    """How many bytes from the start of ``data`` (a spool file from a frame boundary) make
    the largest chunk of whole frames, and the trailer if it fits whole, of at most
    ``limit`` bytes. 0 means no whole frame is there yet (or ``limit`` is below one frame).
    Raises :class:`SealedFormatError` when ``data`` is not frames at all."""
    view = memoryview(data)
    pos = 0
    while len(view) - pos >= _U32.size:
        (n,) = _U32.unpack_from(view, pos)
        if n == TRAILER_MARK:
            if len(view) - pos < 2 * _U32.size:
                break
            (t,) = _U32.unpack_from(view, pos + _U32.size)
            if not MIN_TRAILER <= t <= MAX_TRAILER:
                raise SealedFormatError(f"signature trailer length {t} out of range")
            end = pos + 2 * _U32.size + t
            return end if end <= min(len(view), limit) else pos
        if not TAG_LEN <= n <= MAX_FRAME:
            raise SealedFormatError(f"frame length {n} out of range at offset {pos}")
        end = pos + _U32.size + n
        if end > len(view) or end > limit:
            break
        pos = end
    return pos
