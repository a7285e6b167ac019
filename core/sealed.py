"""The sealed recording format, version 1 (FORMAT.md), sans-IO.

:class:`SealedWriter` turns plaintext into the bytes of a sealed file, frame by frame;
:class:`SealedReader` takes those bytes in any pieces and gives the plaintext back, checking
every frame as it comes. Neither touches a file, a socket or a clock: the caller passes the
time (``created_at``) and moves the bytes.

Invariants (FORMAT.md):
- one fresh 32-byte data key (DEK) per file, HPKE-sealed (RFC 9180 base mode, single shot,
  DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305) to every recipient;
- frame ``i`` is ChaCha20-Poly1305 under the DEK with nonce ``u64 i || last-byte || 000``
  and aad SHA-256(header bytes as stored), so any reordering, removal, substitution or
  header change fails authentication, and only the last frame opens with last-byte 1;
- every length field is bounded before anything is buffered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

from sshaudit.errors import NoRecipientError, SealedFormatError, TamperedError
from sshaudit.hashing import OverlappedSha256
from sshaudit.keys import AuditorPrivateKey, AuditorPublicKey

MAGIC = b"SSHAUDIT\x00\x01"
FORMAT_NAME = "sshaudit-sealed"
VERSION = 1
SUITE_NAME = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/ChaCha20Poly1305"
CONTENT_TYPE = "application/x-asciicast; version=2"
HPKE_INFO = b"sshaudit-sealed v1 dek"

MAX_HEADER = 1 << 20
MAX_FRAME_PLAINTEXT = 1 << 20
TAG_LEN = 16
MAX_FRAME = MAX_FRAME_PLAINTEXT + TAG_LEN
TRAILER_MARK = 0xFFFFFFFF
MAX_TRAILER = 64 * 1024
MAX_RECIPIENTS = 256
DEK_LEN = 32
ENC_LEN = 32
SEALED_DEK_LEN = DEK_LEN + TAG_LEN

_U32 = struct.Struct(">I")
_TRAILER_MARK_BYTES = _U32.pack(TRAILER_MARK)
_NONCE = struct.Struct(">QB3x")  # u64 frame index || last-frame byte || three zero bytes
_KID_RE = re.compile(r"[0-9a-f]{16}")

_SUITE = CipherSuite.new(
    KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305
)


def frame_nonce(index: int, last: bool) -> bytes:
    return _NONCE.pack(index, 1 if last else 0)


def rfc3339(moment: datetime) -> str:
    """RFC 3339 UTC with a ``Z``, second precision, as in the header's ``created_at``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Completeness(Enum):
    COMPLETE = "complete"
    TRUNCATED = "truncated"


class SignatureStatus(Enum):
    VALID = "valid"
    INVALID = "invalid"
    ABSENT = "absent"
    UNCHECKED = "unchecked"  # present, but the reader was told not to check it


@dataclass(frozen=True)
class Recipient:
    kid: str
    enc: bytes
    ct: bytes


@dataclass(frozen=True)
class SealedHeader:
    """A parsed header; ``raw`` is the exact bytes stored, which the frames authenticate."""

    raw: bytes
    session_id: str
    host_id: str
    created_at: str
    recipients: tuple[Recipient, ...]
    host_key: bytes | None
    fields: Mapping[str, Any] = field(repr=False)

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _b64(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, str):
        raise SealedFormatError(f"header: {what} is not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SealedFormatError(f"header: {what} is not base64") from exc
    if len(raw) != length:
        raise SealedFormatError(f"header: {what} is not {length} bytes")
    return raw


def _recipient(obj: object, n: int) -> Recipient:
    if not isinstance(obj, dict):
        raise SealedFormatError(f"header: recipient {n} is not an object")
    kid = obj.get("kid")
    if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
        raise SealedFormatError(f"header: recipient {n} has no valid kid")
    enc = _b64(obj.get("enc"), ENC_LEN, f"recipient {n} enc")
    ct = _b64(obj.get("ct"), SEALED_DEK_LEN, f"recipient {n} ct")
    return Recipient(kid, enc, ct)


def _str_field(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise SealedFormatError(f"header: {name!r} is missing or not a string")
    return value


def parse_header(raw: bytes) -> SealedHeader:
    """Parse and check the header JSON (FORMAT.md "Header fields")."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: CPython's json raises it, not ValueError, for deep nesting.
        raise SealedFormatError("header: not UTF-8 JSON") from exc
    if not isinstance(doc, dict):
        raise SealedFormatError("header: not a JSON object")
    checks = (("format", FORMAT_NAME), ("version", VERSION), ("suite", SUITE_NAME))
    for name, want in checks:
        value = doc.get(name)
        if value != want or type(value) is not type(want):
            # The value is attacker-controlled and may be huge: quote only its start.
            raise SealedFormatError(f"header: {name} is {_short(value)}, expected {want!r}")
    recipients = doc.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        raise SealedFormatError("header: recipients must be a non-empty list")
    if len(recipients) > MAX_RECIPIENTS:
        raise SealedFormatError(f"header: more than {MAX_RECIPIENTS} recipients")
    host_key = doc.get("host_key")
    return SealedHeader(
        raw=bytes(raw),
        session_id=_str_field(doc, "session_id"),
        host_id=_str_field(doc, "host_id"),
        created_at=_str_field(doc, "created_at"),
        recipients=tuple(_recipient(r, i) for i, r in enumerate(recipients)),
        host_key=None if host_key is None else _b64(host_key, 32, "host_key"),
        fields=doc,
    )


class SealedWriter:
    """Seal one recording. Call :meth:`start`, then :meth:`write` any number of times
    (each call gives whole frames), then :meth:`close` (the last frame and, with a host
    key, the signature trailer). Each method returns the bytes to append to the file."""

    def __init__(
        self,
        *,
        recipients: Sequence[AuditorPublicKey],
        session_id: str,
        host_id: str,
        created_at: datetime,
        host_key: Ed25519PrivateKey | None = None,
        extra: Mapping[str, Any] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not recipients:
            raise ValueError("a sealed file needs at least one recipient")
        self._dek = random_bytes(DEK_LEN)
        self._aead = ChaCha20Poly1305(self._dek)
        doc: dict[str, Any] = dict(extra or {})
        doc.update(
            format=FORMAT_NAME,
            version=VERSION,
            suite=SUITE_NAME,
            session_id=session_id,
            host_id=host_id,
            created_at=rfc3339(created_at),
            content_type=CONTENT_TYPE,
            recipients=[self._recipient(pub, session_id) for pub in recipients],
        )
        self._host_key = host_key
        if host_key is not None:
            doc["host_key"] = base64.b64encode(host_key.public_key().public_bytes_raw()).decode()
        self.header_bytes = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if len(self.header_bytes) > MAX_HEADER:
            raise ValueError("header larger than 1 MiB")
        self._aad = hashlib.sha256(self.header_bytes).digest()
        # Only a signed file needs the running hash (FORMAT.md "Trailer").
        self._sig_hash = OverlappedSha256(self.header_bytes) if host_key is not None else None
        self.frames = 0
        self.closed = False

    def _recipient(self, pub: AuditorPublicKey, session_id: str) -> dict[str, str]:
        pkr = _SUITE.kem.deserialize_public_key(pub.raw)
        # RFC 9180 section 6.1: single-shot Seal is SetupBaseS then one Seal (pyhpke's
        # own single-shot helpers are not implemented, so use the context API).
        enc, ctx = _SUITE.create_sender_context(pkr, info=HPKE_INFO)
        ct = ctx.seal(self._dek, aad=session_id.encode())
        return {
            "kid": pub.kid,
            "enc": base64.b64encode(enc).decode(),
            "ct": base64.b64encode(ct).decode(),
        }

    def start(self) -> bytes:
        return MAGIC + _U32.pack(len(self.header_bytes)) + self.header_bytes

    def _frame(self, plaintext: bytes | memoryview, last: bool) -> bytearray:
        if self.closed:
            raise ValueError("the sealed file is closed")
        size = len(plaintext) + TAG_LEN
        out = bytearray(4 + size)  # length prefix and ciphertext in one buffer, no copy
        _U32.pack_into(out, 0, size)
        nonce = frame_nonce(self.frames, last)
        self._aead.encrypt_into(nonce, plaintext, self._aad, memoryview(out)[4:])
        self.frames += 1
        if self._sig_hash is not None:
            self._sig_hash.update(memoryview(out))
        return out

    # The buffers returned below are the caller's to write out, not to modify: a signing
    # writer may still be hashing them on the worker thread (core/hashing.py), which holds
    # a memoryview of each, so resizing one raises BufferError instead of breaking the hash.

    def write(self, plaintext: bytes | memoryview) -> bytearray:
        """Seal ``plaintext`` as one frame (or several, past 1 MiB); none of them last."""
        view = memoryview(plaintext)
        parts = [
            self._frame(view[i : i + MAX_FRAME_PLAINTEXT], last=False)
            for i in range(0, max(len(view), 1), MAX_FRAME_PLAINTEXT)
        ]
        return parts[0] if len(parts) == 1 else bytearray().join(parts)

    def close(self, plaintext: bytes | memoryview = b"") -> bytearray:
        """Seal the rest as the last frame, then the signature trailer if signing."""
        view = memoryview(plaintext)
        cut = max(len(view) - MAX_FRAME_PLAINTEXT, 0)
        parts = [self.write(view[:cut])] if cut else []
        parts.append(self._frame(view[cut:], last=True))
        self.closed = True
        if self._host_key is not None and self._sig_hash is not None:
            sig = self._host_key.sign(self._sig_hash.digest())
            doc = json.dumps({"alg": "Ed25519", "sig": base64.b64encode(sig).decode()}).encode()
            parts.append(bytearray(_U32.pack(TRAILER_MARK) + _U32.pack(len(doc)) + doc))
        return bytearray().join(parts)


class _State(Enum):
    MAGIC = "magic"
    HEADER_LEN = "header length"
    HEADER = "header"
    FRAME_LEN = "frame length"
    FRAME = "frame"
    TRAILER_LEN = "trailer length"
    TRAILER = "trailer"
    DONE = "done"


@dataclass(frozen=True)
class ReadResult:
    """What a whole file turned out to be."""

    header: SealedHeader
    completeness: Completeness
    torn: bool
    frames: int
    signature: SignatureStatus
    plaintext_bytes: int


def open_dek(header: SealedHeader, keys: Sequence[AuditorPrivateKey]) -> bytes:
    """Find a recipient entry for one of ``keys`` by kid and open the DEK (RFC 9180)."""
    by_kid = {r.kid: r for r in header.recipients}
    for key in keys:
        entry = by_kid.get(key.public.kid)
        if entry is None:
            continue
        skr = _SUITE.kem.deserialize_private_key(key.raw)
        try:
            ctx = _SUITE.create_recipient_context(entry.enc, skr, info=HPKE_INFO)
            dek = ctx.open(entry.ct, aad=header.session_id.encode())
        except Exception as exc:  # pyhpke raises its own OpenError and others
            raise TamperedError(
                f"the data key for key id {entry.kid} does not open: header tampered with"
            ) from exc
        if len(dek) != DEK_LEN:
            raise TamperedError("the data key has the wrong length")
        return bytes(dek)
    kids = ", ".join(k.public.kid for k in keys) or "none"
    raise NoRecipientError(
        f"no recipient entry for key id {kids} in this file "
        f"(it is sealed to {', '.join(r.kid for r in header.recipients)})"
    )


class SealedReader:
    """Read a sealed file fed in pieces. :meth:`feed` returns the plaintext of every frame
    completed by the new bytes; :meth:`finish` says how the file ended. Any failure of
    authentication raises :class:`TamperedError` naming the frame, and the reader stays
    failed: nothing after a bad frame is ever returned."""

    def __init__(self, keys: Sequence[AuditorPrivateKey], *, check_signature: bool = True) -> None:
        self._keys = list(keys)
        self._check = check_signature
        self._buf = bytearray()
        self._state = _State.MAGIC
        self._need = len(MAGIC)
        self._aead: ChaCha20Poly1305 | None = None
        self._aad = b""
        self._sig_hash: OverlappedSha256 | None = None
        self._last_seen = False
        self._signature = SignatureStatus.ABSENT
        self._failed: Exception | None = None
        self._out = bytearray()
        self._out_len = 0
        self.header: SealedHeader | None = None
        self.frames = 0
        self.plaintext_bytes = 0

    def feed(self, data: bytes) -> bytearray:
        if self._failed is not None:
            raise SealedFormatError("the reader already failed") from self._failed
        # Pieces are parsed straight out of an immutable buffer through memoryviews: no
        # per-frame copies, and the hashing thread may keep a view after we return. Only a
        # piece that straddles two feeds is copied, into self._buf.
        view = memoryview(data if type(data) is bytes else bytes(data))
        # Plaintext is decrypted straight into one buffer (decrypt_into): no per-frame
        # objects and no join. It cannot exceed the ciphertext held plus what came in.
        self._out = bytearray(len(view) + len(self._buf))
        self._out_len = 0
        pos = 0
        try:
            while self._state is not _State.DONE:
                chunk, pos = self._next_piece(view, pos)
                if chunk is None:
                    break
                self._step(chunk)
            if self._state is _State.DONE and (self._buf or pos < len(view)):
                raise SealedFormatError("data after the signature trailer")
        except Exception as exc:
            self._failed = exc
            raise
        out, self._out = self._out, bytearray()
        del out[self._out_len :]
        return out

    def _next_piece(self, view: memoryview, pos: int) -> tuple[memoryview | None, int]:
        """The next ``self._need`` bytes, or None (keeping the rest for the next feed)."""
        if self._buf:
            take = min(self._need - len(self._buf), len(view) - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) < self._need:
                return None, pos
            piece = memoryview(bytes(self._buf))
            self._buf.clear()
            return piece, pos
        if len(view) - pos >= self._need:
            return view[pos : pos + self._need], pos + self._need
        self._buf += view[pos:]
        return None, len(view)

    def _step(self, chunk: memoryview) -> None:
        state = self._state
        # The two states of the frame loop come first: they are all but every step.
        if state is _State.FRAME:
            self._open_frame(chunk)
            return
        if state is _State.FRAME_LEN:
            self._frame_len(_U32.unpack(chunk)[0])
        elif state is _State.MAGIC:
            if bytes(chunk) != MAGIC:
                raise SealedFormatError("not a sealed recording (bad magic or version)")
            self._expect(_State.HEADER_LEN, 4)
        elif state is _State.HEADER_LEN:
            (n,) = _U32.unpack(chunk)
            if not 2 <= n <= MAX_HEADER:
                raise SealedFormatError(f"header length {n} out of range (2..{MAX_HEADER})")
            self._expect(_State.HEADER, n)
        elif state is _State.HEADER:
            self._start(parse_header(bytes(chunk)))
        elif state is _State.TRAILER_LEN:
            (n,) = _U32.unpack(chunk)
            if not 2 <= n <= MAX_TRAILER:
                raise SealedFormatError(f"signature trailer length {n} out of range")
            self._expect(_State.TRAILER, n)
        elif state is _State.TRAILER:
            self._signature = self._check_signature(bytes(chunk))
            self._expect(_State.DONE, 0)

    def _expect(self, state: _State, need: int) -> None:
        self._state, self._need = state, need

    def _start(self, header: SealedHeader) -> None:
        self.header = header
        self._aead = ChaCha20Poly1305(open_dek(header, self._keys))
        self._aad = header.digest
        # SHA-256 over every byte bounds the reader's speed (it is slower than
        # ChaCha20-Poly1305 here), so it runs only when a signature could be valid.
        if self._check and header.host_key is not None:
            self._sig_hash = OverlappedSha256(header.raw)
        self._expect(_State.FRAME_LEN, 4)

    def _frame_len(self, n: int) -> None:
        if n == TRAILER_MARK:
            self._expect(_State.TRAILER_LEN, 4)
        elif self._last_seen:
            raise SealedFormatError(f"frame {self.frames} comes after the last frame")
        elif not TAG_LEN <= n <= MAX_FRAME:
            raise SealedFormatError(f"frame {self.frames}: length {n} out of range")
        else:
            if self._sig_hash is not None:
                self._sig_hash.update(_U32.pack(n))
            self._expect(_State.FRAME, n)

    def _open_frame(self, ct: memoryview) -> None:
        assert self._aead is not None
        i = self.frames
        size = len(ct) - TAG_LEN
        plain = memoryview(self._out)[self._out_len : self._out_len + size]
        try:
            self._aead.decrypt_into(frame_nonce(i, False), ct, self._aad, plain)
        except InvalidTag:
            try:
                self._aead.decrypt_into(frame_nonce(i, True), ct, self._aad, plain)
            except InvalidTag:
                raise TamperedError(
                    f"frame {i} failed authentication: the file was altered, reordered "
                    "or its header changed",
                    frame=i,
                ) from None
            self._last_seen = True
        if self._sig_hash is not None:
            self._sig_hash.update(ct)
        self.frames += 1
        self.plaintext_bytes += size
        self._out_len += size
        self._expect(_State.FRAME_LEN, 4)

    def _check_signature(self, doc_bytes: bytes) -> SignatureStatus:
        try:
            doc = json.loads(doc_bytes.decode("utf-8"))
            alg, sig_b64 = doc["alg"], doc["sig"]
            sig = base64.b64decode(sig_b64, validate=True)
        except (
            UnicodeDecodeError,
            ValueError,
            TypeError,
            KeyError,
            binascii.Error,
            RecursionError,  # json raises it, not ValueError, for deeply nested input
        ) as exc:
            raise SealedFormatError("signature trailer is not valid JSON") from exc
        assert self.header is not None
        if not self._check:
            return SignatureStatus.UNCHECKED
        if alg != "Ed25519" or self._sig_hash is None or not self._last_seen:
            return SignatureStatus.INVALID
        assert self.header.host_key is not None
        try:
            pub = Ed25519PublicKey.from_public_bytes(self.header.host_key)
            pub.verify(sig, self._sig_hash.digest())
        except (InvalidSignature, ValueError):
            return SignatureStatus.INVALID
        return SignatureStatus.VALID

    def finish(self) -> ReadResult:
        """Close the reader: how complete the file was and what its signature said."""
        if self._failed is not None:
            raise SealedFormatError("the reader already failed") from self._failed
        try:
            return self._finish()
        except Exception as exc:
            self._failed = exc
            raise

    def _finish(self) -> ReadResult:
        if self.header is None:
            raise SealedFormatError(f"file ends inside the {self._state.value}")
        signature = self._signature
        if self._last_seen and self._state is _State.FRAME_LEN and self._buf:
            # 1-3 bytes after the last frame: only a trailer mark cut short may be there
            # (no frame may follow the last one). The frames are all there: not torn.
            if not _TRAILER_MARK_BYTES.startswith(self._buf):
                raise SealedFormatError(f"frame {self.frames} comes after the last frame")
            signature = SignatureStatus.INVALID
        torn = self._state is _State.FRAME or (
            self._state is _State.FRAME_LEN and len(self._buf) > 0 and not self._last_seen
        )
        if self._state in (_State.TRAILER_LEN, _State.TRAILER):
            signature = SignatureStatus.INVALID  # a trailer cut short proves nothing
        complete = self._last_seen and not torn
        return ReadResult(
            header=self.header,
            completeness=Completeness.COMPLETE if complete else Completeness.TRUNCATED,
            torn=torn,
            frames=self.frames,
            signature=signature if complete else _no_last(signature),
            plaintext_bytes=self.plaintext_bytes,
        )


def _no_last(status: SignatureStatus) -> SignatureStatus:
    # FORMAT.md: a signature is invalid when the file has no last frame.
    return SignatureStatus.ABSENT if status is SignatureStatus.ABSENT else SignatureStatus.INVALID
