"""The sealed format (FORMAT.md), library level: vectors, round trips, limits.

Two implementations are checked against each other and against fixed data: the project's
``sshaudit.sealed`` and ``independent_format`` (written from FORMAT.md and RFC 9180 alone).
The independent one is itself checked against RFC 9180 appendix A.2.1 first.
"""

from __future__ import annotations

import base64
import itertools
import json
import struct
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import independent_format as ind
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

from sshaudit import sealed
from sshaudit.errors import (
    NoRecipientError,
    SealedFormatError,
    SSHAuditError,
    TamperedError,
)
from sshaudit.keys import AuditorPrivateKey, AuditorPublicKey
from sshaudit.sealed import Completeness, ReadResult, SealedReader, SealedWriter, SignatureStatus

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


# ---------------------------------------------------------------- RFC 9180 A.2.1

A21 = {  # RFC 9180 A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305, base
    "info": "4f6465206f6e2061204772656369616e2055726e",
    "ikmE": "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b",
    "pkEm": "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
    "skEm": "f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600",
    "ikmR": "1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df",
    "pkRm": "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a",
    "skRm": "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb",
    "enc": "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
    "shared_secret": "0bbe78490412b4bbea4812666f7916932b828bba79942424abb65244930d69a7",
    "key_schedule_context": "00431df6cd95e11ff49d7013563baf7f11588c75a6611ee2a4404a49306ae4cf"
    "c5b69c5718a60cc5876c358d3f7fc31ddb598503f67be58ea1e798c0bb19eb9796",
    "secret": "5b9cd775e64b437a2335cf499361b2e0d5e444d5cb41a8a53336d8fe402282c6",
    "key": "ad2744de8e17f4ebba575b3f5f5a8fa1f69c2a07f6e7500bc60ca6e3e3ec1c91",
    "base_nonce": "5c4d98150661b848853b547f",
    "pt": "4265617574792069732074727574682c20747275746820626561757479",
}
A21_ENCRYPTIONS = [  # (sequence number, aad, nonce, ct)
    (0, "436f756e742d30", "5c4d98150661b848853b547f",
     "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28"),
    (1, "436f756e742d31", "5c4d98150661b848853b547e",
     "6b53c051e4199c518de79594e1c4ab18b96f081549d45ce015be002090bb119e85285337cc95ba5f59992dc98c"),
    (2, "436f756e742d32", "5c4d98150661b848853b547d",
     "71146bd6795ccc9c49ce25dda112a48f202ad220559502cef1f34271e0cb4b02b4f10ecac6f48c32f878fae86b"),
    (255, "436f756e742d323535", "5c4d98150661b848853b5480",
     "18ab939d63ddec9f6ac2b60d61d36a7375d2070c9b683861110757062c52b8880a5f6b3936da9cd6c23ef2a95c"),
]  # fmt: skip


def h(name: str) -> bytes:
    return bytes.fromhex(A21[name])


def test_rfc9180_a21_derive_key_pair() -> None:
    assert ind.derive_key_pair(h("ikmE")) == (h("skEm"), h("pkEm"))
    assert ind.derive_key_pair(h("ikmR")) == (h("skRm"), h("pkRm"))


def test_rfc9180_a21_encap_decap_and_key_schedule() -> None:
    shared_secret, enc = ind.encap(h("pkRm"), h("ikmE"))
    assert (shared_secret, enc) == (h("shared_secret"), h("enc"))
    assert ind.decap(enc, h("skRm")) == h("shared_secret")
    ctx = ind.key_schedule(shared_secret, h("info"))
    assert ctx.key_schedule_context == h("key_schedule_context")
    assert (ctx.secret, ctx.key, ctx.base_nonce) == (h("secret"), h("key"), h("base_nonce"))


@pytest.mark.parametrize(("seq", "aad", "nonce", "ct"), A21_ENCRYPTIONS)
def test_rfc9180_a21_encryptions(seq: int, aad: str, nonce: str, ct: str) -> None:
    ctx = ind.key_schedule(h("shared_secret"), h("info"))
    assert ctx.nonce(seq).hex() == nonce
    assert ctx.seal(seq, bytes.fromhex(aad), h("pt")).hex() == ct
    assert ctx.open(seq, bytes.fromhex(aad), bytes.fromhex(ct)) == h("pt")


def test_rfc9180_a21_single_shot() -> None:
    aad, ct = bytes.fromhex(A21_ENCRYPTIONS[0][1]), bytes.fromhex(A21_ENCRYPTIONS[0][3])
    assert ind.hpke_seal(h("pkRm"), h("info"), aad, h("pt"), h("ikmE")) == (h("enc"), ct)
    assert ind.hpke_open(h("enc"), h("skRm"), h("info"), aad, ct) == h("pt")
    with pytest.raises(ind.FormatViolationError):
        ind.hpke_open(h("enc"), h("skRm"), h("info"), b"other aad", ct)


def test_independent_hpke_interoperates_with_pyhpke() -> None:
    suite = CipherSuite.new(
        KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305
    )
    sk, pk = ind.derive_key_pair(b"interop test key material 32 by.")
    enc, ct = ind.hpke_seal(pk, b"info", b"aad", b"secret message")
    ctx = suite.create_recipient_context(enc, suite.kem.deserialize_private_key(sk), info=b"info")
    assert ctx.open(ct, aad=b"aad") == b"secret message"
    enc2, sender = suite.create_sender_context(suite.kem.deserialize_public_key(pk), info=b"info")
    ct2 = sender.seal(b"the other way", aad=b"aad")
    assert ind.hpke_open(enc2, sk, b"info", b"aad", ct2) == b"the other way"


# ---------------------------------------------------------------- the vectors


def test_vector_keys_match_their_public_files() -> None:
    for name in ("auditor1", "auditor2"):
        key = AuditorPrivateKey.from_text(vector(f"{name}.key"))
        assert key.public == AuditorPublicKey.from_text(vector(f"{name}.key.pub"))
        assert ind.x25519_public_raw(key.raw) == key.public.raw


@pytest.mark.parametrize("key", [KEY1, KEY2], ids=["auditor1", "auditor2"])
@pytest.mark.parametrize("chunks", [(), (1,) * 300, (7, 13, 100, 1, 1, 1)])
def test_vector_session(key: AuditorPrivateKey, chunks: tuple[int, ...]) -> None:
    plain, result = read(vector("session.sealed"), [key], chunks)
    assert plain == CAST
    assert result.completeness is Completeness.COMPLETE and not result.torn
    assert result.signature is SignatureStatus.VALID
    assert result.header.host_key == HOST_PUB  # valid against host.ed25519.pub
    assert result.header.session_id == SESSION
    assert {r.kid for r in result.header.recipients} == {KEY1.public.kid, KEY2.public.kid}
    assert ind.open_file(vector("session.sealed"), key.raw) == (CAST, True, "valid")


def test_vector_unsigned() -> None:
    plain, result = read(vector("unsigned.sealed"), [KEY1])
    assert (plain, result.completeness, result.signature) == (
        CAST, Completeness.COMPLETE, SignatureStatus.ABSENT
    )  # fmt: skip
    assert ind.open_file(vector("unsigned.sealed"), KEY1.raw) == (CAST, True, "absent")
    with pytest.raises(NoRecipientError) as info:
        read(vector("unsigned.sealed"), [KEY2])
    assert KEY2.public.kid in str(info.value) and KEY1.public.kid in str(info.value)
    assert not [s for s in secret_texts(KEY2.raw) if s in messages(info.value)]
    with pytest.raises(ind.FormatViolationError):
        ind.open_file(vector("unsigned.sealed"), KEY2.raw)
    assert read(vector("unsigned.sealed"), [KEY2, KEY1])[0] == CAST  # any key that fits


@pytest.mark.parametrize("name", ["truncated.sealed", "torn.sealed"])
def test_vector_truncated_and_torn(name: str) -> None:
    plain, result = read(vector(name), [KEY1])
    assert result.completeness is Completeness.TRUNCATED
    assert result.frames == 3 and result.torn is (name == "torn.sealed")
    assert result.signature is SignatureStatus.ABSENT
    assert 0 < len(plain) < len(CAST) and CAST.startswith(plain)
    assert plain == read(vector("truncated.sealed"), [KEY1])[0]  # the same prefix
    assert ind.open_file(vector(name), KEY1.raw) == (plain, False, "absent")


@pytest.mark.parametrize(
    ("name", "frame"),
    [("tampered.sealed", 2), ("reordered.sealed", 1), ("header-tampered.sealed", None)],
)
def test_vector_tampered(name: str, frame: int | None) -> None:
    data = vector(name)
    reader = SealedReader([KEY1])
    got = b""
    with pytest.raises(TamperedError) as info:
        for i in range(len(data)):  # byte by byte: see exactly what comes out before
            got += reader.feed(data[i : i + 1])
    if frame is not None:
        assert info.value.frame == frame
        assert reader.frames == frame  # nothing from the bad frame or after it
    assert CAST.startswith(got)
    assert not [s for s in secret_texts(KEY1.raw) if s in messages(info.value)]
    with pytest.raises(ind.FormatViolationError):
        ind.open_file(data, KEY1.raw)


def test_every_prefix_of_the_session_vector() -> None:
    """Cut anywhere: both readers agree, and only cuts past the last frame are complete."""
    data = vector("session.sealed")
    offsets = ind.frame_offsets(data)
    last_frame_end = offsets[-1] + 4 + struct.unpack(">I", data[offsets[-1] : offsets[-1] + 4])[0]
    for cut in range(len(data) + 1):
        prefix = data[:cut]
        try:
            expected = ind.open_file(prefix, KEY1.raw)
        except ind.FormatViolationError:
            assert cut < offsets[0]  # only a cut inside the magic or header fails
            with pytest.raises(SealedFormatError, match="ends inside"):
                read(prefix, [KEY1])
            continue
        plain, result = read(prefix, [KEY1])
        status = result.signature.value
        assert (plain, result.completeness is Completeness.COMPLETE, status) == expected
        assert CAST.startswith(plain)
        complete = cut >= last_frame_end
        assert expected[1] is complete
        want = "valid" if cut == len(data) else "invalid" if cut > last_frame_end else "absent"
        assert expected[2] == want


# ---------------------------------------------------------------- round trips

PRIVATE = st.binary(min_size=32, max_size=32)  # every 32 bytes are an X25519/Ed25519 key


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], bytes | None, list[int]]:
    """(pieces, recipient private keys, host signing key or None, feed chunk sizes)."""
    data = draw(st.binary(max_size=3000))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    keys = draw(st.lists(PRIVATE, min_size=1, max_size=3, unique=True))
    signing = draw(st.none() | PRIVATE)
    chunks = draw(st.lists(st.integers(1, 400), max_size=12))
    return pieces, keys, signing, chunks


def publics(keys: Sequence[bytes]) -> list[bytes]:
    return [ind.x25519_public_raw(k) for k in keys]


def expected_signature(signing: bytes | None) -> SignatureStatus:
    return SignatureStatus.ABSENT if signing is None else SignatureStatus.VALID


@settings(max_examples=60, deadline=None)
@given(cases())
def test_project_writer_to_project_reader(
    case: tuple[list[bytes], list[bytes], bytes | None, list[int]],
) -> None:
    pieces, keys, signing, chunks = case
    data = project_file(pieces, publics(keys), signing)
    for key in keys:
        plain, result = read(data, [AuditorPrivateKey(key)], chunks)
        assert plain == b"".join(pieces)
        assert result.completeness is Completeness.COMPLETE
        assert result.frames == len(pieces) + 1  # one per write, then the empty last one
        assert result.signature is expected_signature(signing)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_project_writer_to_independent_reader(
    case: tuple[list[bytes], list[bytes], bytes | None, list[int]],
) -> None:
    pieces, keys, signing, _ = case
    data = project_file(pieces, publics(keys), signing)
    for key in keys:
        status = expected_signature(signing).value
        assert ind.open_file(data, key) == (b"".join(pieces), True, status)
    cut_off = project_file(pieces, publics(keys), signing, close=False)
    assert ind.open_file(cut_off, keys[0]) == (b"".join(pieces), False, "absent")


@settings(max_examples=60, deadline=None)
@given(cases())
def test_independent_writer_to_project_reader(
    case: tuple[list[bytes], list[bytes], bytes | None, list[int]],
) -> None:
    pieces, keys, signing, chunks = case
    data = ind.seal_file(pieces, publics(keys), SESSION, "h", signing)
    for key in keys:
        plain, result = read(data, [AuditorPrivateKey(key)], chunks)
        assert plain == b"".join(pieces)
        assert result.completeness is Completeness.COMPLETE
        assert result.signature is expected_signature(signing)
        if signing is not None:
            assert (
                result.header.host_key
                == Ed25519PrivateKey.from_private_bytes(signing).public_key().public_bytes_raw()
            )
    cut_off = ind.seal_file(pieces, publics(keys), SESSION, "h", signing, complete=False)
    plain, result = read(cut_off, [AuditorPrivateKey(keys[0])], chunks)
    assert plain == b"".join(pieces)
    assert (result.completeness, result.signature) == (
        Completeness.TRUNCATED, SignatureStatus.ABSENT
    )  # fmt: skip


def test_project_writer_header_fields() -> None:
    data = project_file([b"x"], [KEY1.public.raw, KEY2.public.raw], bytes(32))
    header = json.loads(data[14 : 14 + struct.unpack(">I", data[10:14])[0]])
    assert data[:10] == b"SSHAUDIT\x00\x01"
    assert header["format"] == "sshaudit-sealed" and header["version"] == 1
    assert header["suite"] == "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/ChaCha20Poly1305"
    assert header["content_type"] == "application/x-asciicast; version=2"
    assert (header["session_id"], header["host_id"]) == (SESSION, "web-1")
    assert header["created_at"] == "2026-11-22T01:02:03Z"
    assert [r["kid"] for r in header["recipients"]] == [
        ind.kid(KEY1.public.raw),
        "3c665f536749eda7",
    ]
    for r in header["recipients"]:
        assert len(base64.b64decode(r["enc"])) == 32 and len(base64.b64decode(r["ct"])) == 48
    host = Ed25519PrivateKey.from_private_bytes(bytes(32)).public_key().public_bytes_raw()
    assert base64.b64decode(header["host_key"]) == host
    again = project_file([b"x"], [KEY1.public.raw, KEY2.public.raw], bytes(32))
    again_header = json.loads(again[14 : 14 + struct.unpack(">I", again[10:14])[0]])
    for one, other in zip(header["recipients"], again_header["recipients"], strict=True):
        assert one["enc"] != other["enc"] and one["ct"] != other["ct"]  # fresh every file


def test_large_plaintexts_split_into_bounded_frames() -> None:
    big = bytes(range(256)) * (10 * 1024 + 3)  # 2.5 MiB and a bit
    writer = SealedWriter(recipients=[KEY1.public], session_id=SESSION, host_id="h",
                          created_at=WHEN)  # fmt: skip
    data = writer.start() + writer.write(big) + writer.close(big[: 1 << 20])
    lengths = [struct.unpack(">I", data[o : o + 4])[0] for o in ind.frame_offsets(data)]
    assert max(lengths) == ind.MAX_FRAME and len(lengths) == 4
    assert read(data, [KEY1])[0] == big + big[: 1 << 20]
    assert ind.open_file(data, KEY1.raw) == (big + big[: 1 << 20], True, "absent")
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"more")
    with pytest.raises(ValueError, match="recipient"):
        SealedWriter(recipients=[], session_id="s", host_id="h", created_at=WHEN)


# ---------------------------------------------------------------- limits and bad input

SIGNER = bytes(range(1, 33))
BASE = ind.build_header([KEY1.public.raw], SESSION, "host-1", SIGNER)
MARK = ind.u32(ind.TRAILER_MARK)


def frames(header: ind.Header, *spec: tuple[int, bool, bytes]) -> bytes:
    return b"".join(ind.seal_frame(header, i, last, pt) for i, last, pt in spec)


GOOD_FRAMES = frames(BASE, (0, False, b"hello "), (1, True, b"world"))
GOOD = ind.file_start(BASE) + GOOD_FRAMES
SIGNED = GOOD + ind.trailer(SIGNER, BASE, GOOD_FRAMES)


def with_header(change: Callable[[dict[str, Any]], object]) -> bytes:
    """A file whose header JSON was changed (the frames follow the new header bytes)."""
    doc = json.loads(BASE.raw)
    change(doc)
    header = ind.Header(json.dumps(doc).encode(), BASE.dek)
    return ind.file_start(header) + frames(header, (0, True, b"hello"))


def fake_recipient(n: int) -> dict[str, str]:
    return {"kid": f"{n:016x}", "enc": ind.b64(bytes(32)), "ct": ind.b64(bytes(48))}


def other_session_entries(doc: dict[str, Any]) -> None:
    doc["recipients"] = json.loads(ind.build_header([KEY1.public.raw], "x", "h").raw)["recipients"]


def header_bytes(raw: bytes) -> bytes:
    return ind.MAGIC + ind.u32(len(raw)) + raw + GOOD_FRAMES


def trailer_json(doc: bytes) -> bytes:
    return GOOD + MARK + ind.u32(len(doc)) + doc


def flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]


def without(name: str) -> Callable[[], bytes]:
    return lambda: with_header(lambda d: d.pop(name))


HEADER_FIELDS = ["format", "version", "suite", "session_id", "host_id", "created_at", "recipients"]
TOO_MANY = sealed.MAX_RECIPIENTS + 1
_F = SealedFormatError
BAD: dict[str, tuple[Callable[[], bytes], type[SSHAuditError]]] = {
    "empty file": (lambda: b"", _F),
    "magic cut short": (lambda: GOOD[:7], _F),
    "bad magic": (lambda: b"XSHAUDIT" + GOOD[8:], _F),
    "bad version byte": (lambda: GOOD[:9] + b"\x02" + GOOD[10:], _F),
    "plain asciicast": (lambda: CAST, _F),
    "header cut short": (lambda: GOOD[:40], _F),
    "header length 0": (lambda: ind.MAGIC + ind.u32(0) + GOOD_FRAMES, _F),
    "header over 1 MiB": (lambda: ind.MAGIC + ind.u32(ind.MAX_HEADER + 1) + b"{}", _F),
    "header not JSON": (lambda: header_bytes(b"{not json"), _F),
    "header not UTF-8": (lambda: header_bytes(b'{"a": "\xff"}'), _F),
    "header an array": (lambda: header_bytes(b"[]"), _F),
    "header nested deeply": (lambda: header_bytes(b"[" * 100_000), _F),
    **{f"header without {name}": (without(name), _F) for name in HEADER_FIELDS},
    "version 2": (lambda: with_header(lambda d: d.update(version=2)), _F),
    "version true": (lambda: with_header(lambda d: d.update(version=True)), _F),
    "version string": (lambda: with_header(lambda d: d.update(version="1")), _F),
    "other format": (lambda: with_header(lambda d: d.update(format="x")), _F),
    "other suite": (lambda: with_header(lambda d: d.update(suite="X25519/AES")), _F),
    "session_id a number": (lambda: with_header(lambda d: d.update(session_id=5)), _F),
    "no recipients": (lambda: with_header(lambda d: d.update(recipients=[])), _F),
    "recipients an object": (lambda: with_header(lambda d: d.update(recipients={})), _F),
    "recipient a string": (lambda: with_header(lambda d: d.update(recipients=["x"])), _F),
    "recipient kid bad": (lambda: with_header(lambda d: d["recipients"][0].update(kid="XY")), _F),
    "recipient enc !b64": (lambda: with_header(lambda d: d["recipients"][0].update(enc="!")), _F),
    "recipient enc short": (
        lambda: with_header(lambda d: d["recipients"][0].update(enc=ind.b64(bytes(31)))),
        _F,
    ),
    "recipient ct short": (
        lambda: with_header(lambda d: d["recipients"][0].update(ct=ind.b64(bytes(47)))),
        _F,
    ),
    "host_key short": (lambda: with_header(lambda d: d.update(host_key=ind.b64(b"k"))), _F),
    "too many recipients": (
        lambda: with_header(
            lambda d: d["recipients"].extend(fake_recipient(n) for n in range(TOO_MANY - 1))
        ),
        _F,
    ),
    "no entry for the key": (
        lambda: ind.seal_file([b"x"], [KEY2.public.raw], SESSION, "h", None),
        NoRecipientError,
    ),
    "DEK sealed for another session": (lambda: with_header(other_session_entries), TamperedError),
    "session_id changed": (lambda: with_header(lambda d: d.update(session_id="x")), TamperedError),
    "frames under another DEK": (
        lambda: ind.file_start(BASE) + frames(ind.Header(BASE.raw, bytes(32)), (0, True, b"x")),
        TamperedError,
    ),
    "frame length 0": (lambda: ind.file_start(BASE) + ind.u32(0), _F),
    "frame length 15": (lambda: ind.file_start(BASE) + ind.u32(15) + bytes(15), _F),
    "frame too long": (lambda: ind.file_start(BASE) + ind.u32(ind.MAX_FRAME + 1), _F),
    "frame bit flipped": (lambda: flip(GOOD, len(ind.file_start(BASE)) + 4), TamperedError),
    "frame index skipped": (
        lambda: ind.file_start(BASE) + frames(BASE, (1, True, b"x")),
        TamperedError,
    ),
    "frame after last": (
        lambda: ind.file_start(BASE) + frames(BASE, (0, True, b"x"), (1, False, b"y")),
        _F,
    ),
    "two last frames": (
        lambda: ind.file_start(BASE) + frames(BASE, (0, True, b"x"), (1, True, b"y")),
        _F,
    ),
    "3 junk bytes after last frame": (lambda: GOOD + b"\x00\x00\x01", _F),
    "data after trailer": (lambda: SIGNED + b"\x00", _F),
    "trailer length 0": (lambda: GOOD + MARK + ind.u32(0), _F),
    "trailer too long": (lambda: GOOD + MARK + ind.u32(sealed.MAX_TRAILER + 1), _F),
    "trailer not JSON": (lambda: trailer_json(b"not json"), _F),
    "trailer without sig": (lambda: trailer_json(b'{"alg": "Ed25519"}'), _F),
    "trailer sig not b64": (lambda: trailer_json(b'{"alg": "Ed25519", "sig": "!"}'), _F),
    "trailer a list": (lambda: trailer_json(b"[1, 2]"), _F),
    "trailer nested deeply": (lambda: trailer_json(b"[" * 60_000), _F),
}


def secret_texts(*raws: bytes) -> list[str]:
    return [t for raw in raws for t in (ind.b64(raw), raw.hex(), ind.b64(raw).rstrip("="))]


SECRETS = secret_texts(KEY1.raw, KEY2.raw, BASE.dek, SIGNER)


def messages(exc: BaseException | None) -> str:
    """Everything a log could show of ``exc``: its text, repr and its whole chain."""
    out = []
    while exc is not None:
        out += [str(exc), repr(exc)]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_file(name: str) -> None:
    build, error = BAD[name]
    data = build()
    for chunk in (len(data) or 1, 7):
        if chunk == 7 and len(data) > 20_000:
            continue
        reader = SealedReader([KEY1])
        failed_in_feed = True
        with pytest.raises(SSHAuditError) as info:
            for pos in range(0, len(data), chunk):
                reader.feed(data[pos : pos + chunk])
            failed_in_feed = False
            reader.finish()
        assert type(info.value) is error, info.value
        text = messages(info.value)
        assert not [s for s in SECRETS if s in text], "key material in an error message"
        if failed_in_feed:
            assert_stays_failed(reader)


def assert_stays_failed(reader: SealedReader) -> None:
    """A reader that failed stays failed, whatever comes next."""
    for data in (b"", GOOD, SIGNED[len(GOOD) :]):
        with pytest.raises(SealedFormatError, match="already failed"):
            reader.feed(data)
    with pytest.raises(SealedFormatError, match="already failed"):
        reader.finish()


def test_the_bad_files_are_good_but_for_their_flaw() -> None:
    """The builders above make valid files when nothing is changed (so each case tests
    its one flaw): the same builders with a no-op change read fine."""
    for data in (GOOD, SIGNED, with_header(lambda d: None)):
        assert read(data, [KEY1])[1].completeness is Completeness.COMPLETE
    assert read(SIGNED, [KEY1])[1].signature is SignatureStatus.VALID
    ok = with_header(lambda d: d["recipients"].extend(fake_recipient(n) for n in range(255)))
    assert read(ok, [KEY1])[0] == b"hello"  # 256 recipients is still fine


def test_lengths_are_checked_before_buffering() -> None:
    for data in (
        ind.MAGIC + ind.u32(ind.MAX_HEADER + 1),
        ind.file_start(BASE) + ind.u32(ind.MAX_FRAME + 1),
        GOOD + MARK + ind.u32(sealed.MAX_TRAILER + 1),
    ):
        with pytest.raises(SealedFormatError, match="out of range"):
            SealedReader([KEY1]).feed(data)  # the length alone, none of what it announces


def padded(pad: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.update(pad=pad)


def test_header_of_exactly_1_MiB() -> None:
    base = len(json.dumps({**json.loads(BASE.raw), "pad": ""}).encode())
    for size, ok in ((ind.MAX_HEADER, True), (ind.MAX_HEADER + 1, False)):
        data = with_header(padded("x" * (size - base)))
        assert struct.unpack(">I", data[10:14])[0] == size
        if ok:
            assert read(data, [KEY1])[0] == b"hello"
        else:
            with pytest.raises(SealedFormatError, match="header length"):
                read(data, [KEY1])


def test_smallest_frame_and_unknown_header_fields() -> None:
    data = with_header(lambda d: d.update(future={"nested": [1, 2]}, content_type="x/y"))
    assert read(data, [KEY1])[0] == b"hello"
    empty = ind.file_start(BASE) + frames(BASE, (0, True, b""))
    assert struct.unpack(">I", empty[len(ind.file_start(BASE)) :][:4])[0] == 16
    plain, result = read(empty, [KEY1])
    assert (plain, result.completeness, result.frames) == (b"", Completeness.COMPLETE, 1)


def test_trailer_without_last_frame() -> None:
    body = frames(BASE, (0, False, b"hello "), (1, False, b"world"))
    data = ind.file_start(BASE) + body + ind.trailer(SIGNER, BASE, body)
    plain, result = read(data, [KEY1])
    assert plain == b"hello world"
    assert (result.completeness, result.signature) == (
        Completeness.TRUNCATED, SignatureStatus.INVALID
    )  # fmt: skip
    assert ind.open_file(data, KEY1.raw) == (b"hello world", False, "invalid")


def test_torn_trailer() -> None:
    for cut in range(len(GOOD) + 1, len(SIGNED)):
        plain, result = read(SIGNED[:cut], [KEY1])
        assert plain == b"hello world", cut
        assert (result.completeness, result.signature) == (
            Completeness.COMPLETE, SignatureStatus.INVALID
        ), cut  # fmt: skip
        assert not result.torn
        assert ind.open_file(SIGNED[:cut], KEY1.raw) == (b"hello world", True, "invalid")


BAD_SIG = flip(base64.b64decode(json.loads(SIGNED[len(GOOD) + 8 :])["sig"]), 20)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (trailer_json(json.dumps({"alg": "Ed25519", "sig": ind.b64(BAD_SIG)}).encode()), "flip"),
        (trailer_json(json.dumps({"alg": "Ed448", "sig": ind.b64(bytes(64))}).encode()), "alg"),
        (trailer_json(json.dumps({"alg": "Ed25519", "sig": ind.b64(bytes(64))}).encode()), "0"),
    ],
)
def test_invalid_signatures(data: bytes, why: str) -> None:
    plain, result = read(data, [KEY1])
    assert (plain, result.completeness) == (b"hello world", Completeness.COMPLETE)
    assert result.signature is SignatureStatus.INVALID, why


def test_signature_without_host_key_in_header() -> None:
    header = ind.build_header([KEY1.public.raw], SESSION, "h")  # no host_key field
    body = frames(header, (0, True, b"x"))
    data = ind.file_start(header) + body + ind.trailer(SIGNER, header, body)
    assert read(data, [KEY1])[1].signature is SignatureStatus.INVALID
    assert ind.open_file(data, KEY1.raw) == (b"x", True, "invalid")


def test_no_plaintext_from_a_bad_frame_or_after_it() -> None:
    data = ind.file_start(BASE) + frames(BASE, (0, False, b"one"), (1, False, b"two"))
    data = flip(data, len(data) - 1) + frames(BASE, (2, True, b"three"))
    reader = SealedReader([KEY1])
    got = b""
    with pytest.raises(TamperedError) as info:
        for i in range(len(data)):
            got += reader.feed(data[i : i + 1])
    assert (got, info.value.frame) == (b"one", 1)
