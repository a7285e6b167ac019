"""A second, independent implementation of FORMAT.md (sealed recording format v1).

Written from FORMAT.md and RFC 9180 alone, as a test oracle for ``sshaudit.sealed``: it
imports nothing from ``sshaudit`` and nothing HPKE-specific, only the ``cryptography``
primitives X25519, HMAC-SHA256 (HKDF is built on it here, RFC 5869), ChaCha20-Poly1305
and Ed25519. It favours plainness over speed and reads whole files (no streaming).

Invariants:
- HPKE is the base mode of RFC 9180 with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and
  ChaCha20-Poly1305, checked against the RFC's test vector A.2.1 by the tests;
- frame ``i`` uses nonce ``u64 i || last || 000`` and aad SHA-256(header bytes as stored);
- :func:`open_file` follows FORMAT.md's reading rules: try last-byte 0 then 1, a frame
  after the last is an error, a missing last frame or a torn frame is "truncated", a
  signature is "invalid" when there is no last frame or the trailer is cut short.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

Signature = Literal["valid", "invalid", "absent"]


class FormatViolationError(Exception):
    """The input does not follow FORMAT.md (or fails authentication)."""


# ---------------------------------------------------------------- RFC 9180, HPKE base mode

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0003
MODE_BASE = 0x00
N_SECRET = N_H = N_PK = N_SK = N_K = 32  # RFC 9180 section 7: X25519, SHA-256, ChaCha20
N_N = 12
N_T = 16


def i2osp(n: int, length: int) -> bytes:
    """RFC 8017 I2OSP, as RFC 9180 section 3 uses it."""
    return n.to_bytes(length, "big")


# RFC 9180 section 4.1 (KEM) and section 5.1 (the whole suite): the suite_id strings.
KEM_SUITE_ID = b"KEM" + i2osp(KEM_ID, 2)
HPKE_SUITE_ID = b"HPKE" + i2osp(KEM_ID, 2) + i2osp(KDF_ID, 2) + i2osp(AEAD_ID, 2)


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """RFC 5869 section 2.2; an empty salt means HashLen zero bytes."""
    return hmac.new(salt or bytes(N_H), ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 section 2.3."""
    if length > 255 * N_H:
        raise ValueError("HKDF-Expand: length too large")
    out, block = b"", b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    """RFC 9180 section 4: LabeledExtract."""
    return hkdf_extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    """RFC 9180 section 4: LabeledExpand."""
    labeled_info = i2osp(length, 2) + b"HPKE-v1" + suite_id + label + info
    return hkdf_expand(prk, labeled_info, length)


def x25519_public_raw(private_raw: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_raw).public_key().public_bytes_raw()


def derive_key_pair(ikm: bytes) -> tuple[bytes, bytes]:
    """RFC 9180 section 7.1.3 for X25519: (skX, pkX) raw, from input keying material."""
    dkp_prk = labeled_extract(KEM_SUITE_ID, b"", b"dkp_prk", ikm)
    sk = labeled_expand(KEM_SUITE_ID, dkp_prk, b"sk", b"", N_SK)
    return sk, x25519_public_raw(sk)


def _dh(private_raw: bytes, public_raw: bytes) -> bytes:
    # cryptography refuses an all-zero result (a low-order point), as RFC 9180 section
    # 7.1.4 requires; the ValueError it raises is translated here.
    try:
        return X25519PrivateKey.from_private_bytes(private_raw).exchange(
            X25519PublicKey.from_public_bytes(public_raw)
        )
    except ValueError as exc:
        raise FormatViolationError("X25519: invalid public key") from exc


def _extract_and_expand(dh: bytes, kem_context: bytes) -> bytes:
    eae_prk = labeled_extract(KEM_SUITE_ID, b"", b"eae_prk", dh)
    return labeled_expand(KEM_SUITE_ID, eae_prk, b"shared_secret", kem_context, N_SECRET)


def encap(pk_r: bytes, ikm_e: bytes | None = None) -> tuple[bytes, bytes]:
    """RFC 9180 section 4.1 Encap: (shared_secret, enc). ``ikm_e`` fixes the ephemeral key
    (DeriveKeyPair), as the RFC's test vectors do; by default it is random."""
    sk_e, pk_e = derive_key_pair(ikm_e if ikm_e is not None else os.urandom(N_SK))
    return _extract_and_expand(_dh(sk_e, pk_r), pk_e + pk_r), pk_e


def decap(enc: bytes, sk_r: bytes) -> bytes:
    """RFC 9180 section 4.1 Decap: the shared secret."""
    if len(enc) != N_PK:
        raise FormatViolationError("HPKE: enc is not 32 bytes")
    return _extract_and_expand(_dh(sk_r, enc), enc + x25519_public_raw(sk_r))


@dataclass(frozen=True)
class Context:
    """RFC 9180 section 5.1 key schedule output (base mode); seq starts at 0."""

    key: bytes
    base_nonce: bytes
    exporter_secret: bytes
    key_schedule_context: bytes
    secret: bytes

    def nonce(self, seq: int) -> bytes:
        """RFC 9180 section 5.2 ComputeNonce: base_nonce XOR I2OSP(seq, Nn)."""
        return bytes(a ^ b for a, b in zip(self.base_nonce, i2osp(seq, N_N), strict=True))

    def seal(self, seq: int, aad: bytes, pt: bytes) -> bytes:
        return ChaCha20Poly1305(self.key).encrypt(self.nonce(seq), pt, aad)

    def open(self, seq: int, aad: bytes, ct: bytes) -> bytes:
        try:
            return ChaCha20Poly1305(self.key).decrypt(self.nonce(seq), ct, aad)
        except InvalidTag as exc:
            raise FormatViolationError("HPKE: open failed") from exc


def key_schedule(shared_secret: bytes, info: bytes) -> Context:
    """RFC 9180 section 5.1 KeySchedule for mode_base (default, empty psk and psk_id)."""
    psk_id_hash = labeled_extract(HPKE_SUITE_ID, b"", b"psk_id_hash", b"")
    info_hash = labeled_extract(HPKE_SUITE_ID, b"", b"info_hash", info)
    context = bytes([MODE_BASE]) + psk_id_hash + info_hash
    secret = labeled_extract(HPKE_SUITE_ID, shared_secret, b"secret", b"")
    return Context(
        key=labeled_expand(HPKE_SUITE_ID, secret, b"key", context, N_K),
        base_nonce=labeled_expand(HPKE_SUITE_ID, secret, b"base_nonce", context, N_N),
        exporter_secret=labeled_expand(HPKE_SUITE_ID, secret, b"exp", context, N_H),
        key_schedule_context=context,
        secret=secret,
    )


def hpke_seal(
    pk_r: bytes, info: bytes, aad: bytes, pt: bytes, ikm_e: bytes | None = None
) -> tuple[bytes, bytes]:
    """RFC 9180 section 6.1 single-shot Seal (base mode): (enc, ct)."""
    shared_secret, enc = encap(pk_r, ikm_e)
    return enc, key_schedule(shared_secret, info).seal(0, aad, pt)


def hpke_open(enc: bytes, sk_r: bytes, info: bytes, aad: bytes, ct: bytes) -> bytes:
    """RFC 9180 section 6.1 single-shot Open (base mode)."""
    return key_schedule(decap(enc, sk_r), info).open(0, aad, ct)


# ---------------------------------------------------------------- FORMAT.md

MAGIC = b"SSHAUDIT" + bytes([0x00, 0x01])
HPKE_INFO = b"sshaudit-sealed v1 dek"
SUITE = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/ChaCha20Poly1305"
MAX_HEADER = 1 << 20
MAX_FRAME = (1 << 20) + 16
TRAILER_MARK = 0xFFFFFFFF


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def kid(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).digest()[:8].hex()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Header:
    """A header as written: its exact bytes and the data key the frames use."""

    raw: bytes
    dek: bytes

    @property
    def aad(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def build_header(
    recipients_pub_raw: Sequence[bytes],
    session_id: str,
    host_id: str,
    signing_key_raw: bytes | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
    dek: bytes | None = None,
) -> Header:
    """A fresh DEK sealed to every recipient, and the header JSON (indented on purpose:
    readers must hash the bytes as stored, whatever the serialization)."""
    dek = dek if dek is not None else os.urandom(32)
    entries = []
    for pub in recipients_pub_raw:
        enc, ct = hpke_seal(pub, HPKE_INFO, session_id.encode("utf-8"), dek)
        entries.append({"kid": kid(pub), "enc": b64(enc), "ct": b64(ct)})
    doc: dict[str, Any] = {
        "format": "sshaudit-sealed",
        "version": 1,
        "suite": SUITE,
        "session_id": session_id,
        "host_id": host_id,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "content_type": "application/x-asciicast; version=2",
        "recipients": entries,
    }
    if signing_key_raw is not None:
        public = Ed25519PrivateKey.from_private_bytes(signing_key_raw).public_key()
        doc["host_key"] = b64(public.public_bytes_raw())
    doc.update(extra or {})
    return Header(json.dumps(doc, indent=1).encode("utf-8"), dek)


def file_start(header: Header) -> bytes:
    return MAGIC + u32(len(header.raw)) + header.raw


def seal_frame(header: Header, index: int, last: bool, plaintext: bytes) -> bytes:
    """One frame as stored: u32 length || ChaCha20-Poly1305 ciphertext."""
    nonce = struct.pack(">Q", index) + bytes([1 if last else 0]) + bytes(3)
    ct = ChaCha20Poly1305(header.dek).encrypt(nonce, plaintext, header.aad)
    return u32(len(ct)) + ct


def trailer(signing_key_raw: bytes, header: Header, frames: bytes) -> bytes:
    """The signature trailer over SHA-256(header bytes || frame bytes as stored)."""
    digest = hashlib.sha256(header.raw + frames).digest()
    sig = Ed25519PrivateKey.from_private_bytes(signing_key_raw).sign(digest)
    doc = json.dumps({"alg": "Ed25519", "sig": b64(sig)}).encode("utf-8")
    return u32(TRAILER_MARK) + u32(len(doc)) + doc


def seal_file(
    plaintext_frames: list[bytes],
    recipients_pub_raw: list[bytes],
    session_id: str,
    host_id: str,
    signing_key_raw: bytes | None,
    *,
    complete: bool = True,
) -> bytes:
    """A whole sealed file, one frame per item (an empty list seals one empty frame).
    ``complete=False`` leaves out the last-frame mark and the trailer (a cut-off file)."""
    header = build_header(recipients_pub_raw, session_id, host_id, signing_key_raw)
    items = plaintext_frames or [b""]
    frames = b"".join(
        seal_frame(header, i, complete and i == len(items) - 1, pt) for i, pt in enumerate(items)
    )
    out = file_start(header) + frames
    if complete and signing_key_raw is not None:
        out += trailer(signing_key_raw, header, frames)
    return out


# ---------------------------------------------------------------- reading


def _u32_at(data: bytes, pos: int) -> int | None:
    return struct.unpack(">I", data[pos : pos + 4])[0] if pos + 4 <= len(data) else None


def _header_dek(raw: bytes, private_raw: bytes) -> tuple[dict[str, Any], bytes]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise FormatViolationError("header is not UTF-8 JSON") from exc
    if not isinstance(doc, dict):
        raise FormatViolationError("header is not a JSON object")
    want = {"format": "sshaudit-sealed", "version": 1, "suite": SUITE}
    for name, value in want.items():
        if doc.get(name) != value or isinstance(doc.get(name), bool):
            raise FormatViolationError(f"header field {name} is wrong")
    if not isinstance(doc.get("session_id"), str) or not isinstance(doc.get("recipients"), list):
        raise FormatViolationError("header lacks session_id or recipients")
    mine = kid(x25519_public_raw(private_raw))
    for entry in doc["recipients"]:
        if isinstance(entry, dict) and entry.get("kid") == mine:
            try:
                enc = base64.b64decode(entry["enc"], validate=True)
                ct = base64.b64decode(entry["ct"], validate=True)
            except (KeyError, TypeError, ValueError) as exc:
                raise FormatViolationError("recipient entry is malformed") from exc
            aad = doc["session_id"].encode("utf-8")
            return doc, hpke_open(enc, private_raw, HPKE_INFO, aad, ct)
    raise FormatViolationError("no recipient entry for this key")


def _signature(doc: dict[str, Any], signed: bytes, sig_json: bytes) -> Signature:
    try:
        sig_doc = json.loads(sig_json.decode("utf-8"))
        sig = base64.b64decode(sig_doc["sig"], validate=True)
        alg = sig_doc["alg"]
        host_key = base64.b64decode(doc["host_key"], validate=True)
    except (ValueError, TypeError, KeyError, RecursionError):
        return "invalid"
    if alg != "Ed25519":
        return "invalid"
    try:
        Ed25519PublicKey.from_public_bytes(host_key).verify(sig, hashlib.sha256(signed).digest())
    except (InvalidSignature, ValueError):
        return "invalid"
    return "valid"


def open_file(data: bytes, private_raw: bytes) -> tuple[bytes, bool, Signature]:
    """Read a whole sealed file: (plaintext, complete, signature)."""
    if data[: len(MAGIC)] != MAGIC:
        raise FormatViolationError("bad magic")
    header_len = _u32_at(data, len(MAGIC))
    if header_len is None or header_len > MAX_HEADER or len(data) < 14 + header_len:
        raise FormatViolationError("header length out of range or header cut short")
    raw = data[14 : 14 + header_len]
    doc, dek = _header_dek(raw, private_raw)
    aad = hashlib.sha256(raw).digest()
    aead = ChaCha20Poly1305(dek)
    pos, index, last_seen = 14 + header_len, 0, False
    plain: list[bytes] = []
    while True:
        n = _u32_at(data, pos)
        if n is None:  # end of file, or 1-3 bytes: a torn length or a torn trailer mark
            rest = data[pos:]
            if last_seen and rest and not u32(TRAILER_MARK).startswith(rest):
                raise FormatViolationError("data after the last frame")
            sig: Signature = "invalid" if rest and last_seen else "absent"
            return b"".join(plain), last_seen, sig
        if n == TRAILER_MARK:
            break
        if last_seen:
            raise FormatViolationError("a frame after the last frame")
        if not 16 <= n <= MAX_FRAME:
            raise FormatViolationError("frame length out of range")
        if pos + 4 + n > len(data):  # torn write: truncated at this frame
            return b"".join(plain), False, "absent"
        ct = data[pos + 4 : pos + 4 + n]
        for last in (False, True):
            nonce = struct.pack(">Q", index) + bytes([int(last)]) + bytes(3)
            try:
                plain.append(aead.decrypt(nonce, ct, aad))
            except InvalidTag:
                continue
            last_seen = last
            break
        else:
            raise FormatViolationError(f"frame {index} fails authentication")
        pos, index = pos + 4 + n, index + 1
    sig_len = _u32_at(data, pos + 4)
    end = pos + 8 + (sig_len or 0)
    if sig_len is None or end > len(data):  # a torn trailer proves nothing
        return b"".join(plain), last_seen, "invalid"
    if end < len(data):
        raise FormatViolationError("data after the trailer")
    signed = raw + data[14 + header_len : pos]
    status = _signature(doc, signed, data[pos + 8 : end]) if last_seen else "invalid"
    return b"".join(plain), last_seen, status


def frame_offsets(data: bytes) -> list[int]:
    """Where each frame's length field starts in a well-formed file (for mutation tests)."""
    header_len = _u32_at(data, len(MAGIC))
    assert header_len is not None
    pos, out = 14 + header_len, []
    while (n := _u32_at(data, pos)) is not None and n != TRAILER_MARK:
        out.append(pos)
        pos += 4 + n
    return out
