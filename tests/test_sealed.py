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
from collections.abc import Sequence

import independent_format as ind
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from pyhpke import AEADId, CipherSuite, KDFId, KEMId
from sealed_helpers import (
    CAST,
    HOST_PUB,
    KEY1,
    KEY2,
    SESSION,
    WHEN,
    messages,
    project_file,
    read,
    secret_texts,
    vector,
)

from sshaudit.errors import (
    NoRecipientError,
    SealedFormatError,
    TamperedError,
)
from sshaudit.keys import AuditorPrivateKey, AuditorPublicKey
from sshaudit.sealed import Completeness, SealedReader, SealedWriter, SignatureStatus

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
