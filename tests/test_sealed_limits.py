"""The sealed format (FORMAT.md), library level: limits, bad input, signatures, failure."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from typing import Any

import independent_format as ind
import pytest
from sealed_helpers import (
    CAST,
    KEY1,
    KEY2,
    SESSION,
    messages,
    read,
    secret_texts,
)

from sshaudit import sealed
from sshaudit.errors import (
    NoRecipientError,
    SealedFormatError,
    SSHAuditError,
    TamperedError,
)
from sshaudit.sealed import Completeness, SealedReader, SignatureStatus

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


SECRETS = secret_texts(KEY1.raw, KEY2.raw, BASE.dek, SIGNER)


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
