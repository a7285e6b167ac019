"""collector/upload.py: the sans-IO checks of the upload protocol (prefix, chunks, trailer,
signature) and plan_chunk, which the agent uses to cut its spool files."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import pytest
from collector_helpers import AUDITOR, T0, Host, cast_pieces, make_sealed, new_session_id
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from sshaudit.collector import upload
from sshaudit.collector.problems import (
    BadRequestError,
    CollectorError,
    ForbiddenError,
    UnprocessableError,
)
from sshaudit.errors import SealedFormatError
from sshaudit.sealed import SealedWriter

U32 = struct.Struct(">I")
HOST = Host("web-1", "", Ed25519PrivateKey.generate(), "web-1")
SID = new_session_id()
FILE = make_sealed(HOST, SID, cast_pieces(8))
HOST_KEY = HOST.key.public_key().public_bytes_raw()


def code(exc: pytest.ExceptionInfo[CollectorError]) -> str:
    return exc.value.code


def test_parse_prefix_accepts_exactly_the_prefix() -> None:
    prefix = upload.parse_prefix(FILE.prefix)
    assert prefix.length == len(FILE.prefix)
    assert prefix.header.session_id == SID
    assert prefix.header.host_key == HOST_KEY


@pytest.mark.parametrize(
    ("body", "want"),
    [
        (b"", "malformed_prefix"),
        (b"SSHAUDIT\x00\x02" + FILE.prefix[10:], "malformed_prefix"),  # another version
        (FILE.prefix + b"x", "malformed_prefix"),  # more than the prefix
        (FILE.prefix[:-1], "malformed_prefix"),  # less
        (FILE.prefix[:10] + U32.pack(1) + b"{", "malformed_prefix"),  # length below 2
        (FILE.prefix[:10] + U32.pack((1 << 20) + 1), "malformed_prefix"),
        (FILE.prefix[:10] + U32.pack(2) + b"[]", "malformed_header"),
    ],
)
def test_parse_prefix_refuses(body: bytes, want: str) -> None:
    with pytest.raises(BadRequestError) as exc:
        upload.parse_prefix(body)
    assert code(exc) == want


def test_check_header_rules() -> None:
    header = upload.parse_prefix(FILE.prefix).header
    upload.check_header(header, session_id=SID, host_id="web-1", host_key=HOST_KEY)
    with pytest.raises(ForbiddenError):
        upload.check_header(header, session_id=SID, host_id="web-2", host_key=HOST_KEY)
    with pytest.raises(UnprocessableError) as exc:
        upload.check_header(header, session_id=new_session_id(), host_id="web-1", host_key=HOST_KEY)
    assert code(exc) == "session_id_mismatch"
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(UnprocessableError) as exc:
        upload.check_header(header, session_id=SID, host_id="web-1", host_key=other)
    assert code(exc) == "host_key_mismatch"


def test_check_header_refuses_unsigned() -> None:
    w = SealedWriter(recipients=[AUDITOR.public], session_id=SID, host_id="web-1", created_at=T0)
    header = upload.parse_prefix(w.start()).header
    with pytest.raises(UnprocessableError) as exc:
        upload.check_header(header, session_id=SID, host_id="web-1", host_key=HOST_KEY)
    assert code(exc) == "unsigned_recording"


def test_scan_chunk_counts_frames_and_finds_the_trailer() -> None:
    scan = upload.scan_chunk(FILE.body)
    assert scan.frames == len(FILE.frames)
    assert scan.frames_end == sum(len(f) for f in FILE.frames)
    assert scan.signature is not None and len(scan.signature) == 64
    assert upload.scan_chunk(b"".join(FILE.frames[:2])) == upload.ChunkScan(
        2, len(FILE.frames[0]) + len(FILE.frames[1]), None
    )
    assert FILE.trailer is not None
    only_trailer = upload.scan_chunk(FILE.trailer)
    assert (only_trailer.frames, only_trailer.frames_end) == (0, 0)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        FILE.frames[0][:-1],  # torn frame
        FILE.frames[0][:3],  # torn length
        U32.pack(15) + b"x" * 15,  # below the tag length
        U32.pack((1 << 20) + 17) + b"x" * 20,  # above 1 MiB + 16
        FILE.frames[0] + U32.pack(0xFFFFFFFF),  # trailer mark without its length
        FILE.frames[0] + U32.pack(0xFFFFFFFF) + U32.pack(1) + b"{",  # trailer too short
        FILE.frames[0] + U32.pack(0xFFFFFFFF) + U32.pack(70000),  # trailer too long
        FILE.frames[0] + (FILE.trailer or b"") + FILE.frames[1],  # data after the trailer
        FILE.frames[0] + (FILE.trailer or b"")[:-1],  # trailer cut
    ],
)
def test_scan_chunk_refuses_anything_but_whole_frames(body: bytes) -> None:
    with pytest.raises(BadRequestError) as exc:
        upload.scan_chunk(body)
    assert code(exc) == "malformed_chunk"


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b'{"alg": "RSA", "sig": "AAAA"}',
        b'{"alg": "Ed25519"}',
        b'{"alg": "Ed25519", "sig": "AAAA"}',
        b"[" * 100000,
        b'{"alg": "Ed25519", "sig": "!!"}',
    ],
)
def test_parse_trailer_refuses(doc: bytes) -> None:
    with pytest.raises(UnprocessableError) as exc:
        upload.parse_trailer(doc)
    assert code(exc) == "malformed_trailer"


def _signed_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_signature_verifies_over_the_bytes_as_stored() -> None:
    assert FILE.trailer is not None
    sig = upload.parse_trailer(FILE.trailer[8:])
    signed = FILE.prefix[14:] + b"".join(FILE.frames)
    upload.verify_signature(HOST_KEY, upload.signed_digest([signed]), sig)
    # the same digest however the bytes are cut
    assert upload.signed_digest([signed[:7], signed[7:]]) == _signed_digest(signed)
    swapped = FILE.prefix[14:] + FILE.frames[0] + FILE.frames[2] + FILE.frames[1]
    swapped += b"".join(FILE.frames[3:])
    with pytest.raises(UnprocessableError) as exc:
        upload.verify_signature(HOST_KEY, upload.signed_digest([swapped]), sig)
    assert code(exc) == "signature_invalid"
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(UnprocessableError):
        upload.verify_signature(other, upload.signed_digest([signed]), sig)


def test_signature_of_a_forged_trailer_fails() -> None:
    forger = Ed25519PrivateKey.generate()
    signed = FILE.prefix[14:] + b"".join(FILE.frames)
    sig = forger.sign(hashlib.sha256(signed).digest())
    doc = json.dumps({"alg": "Ed25519", "sig": base64.b64encode(sig).decode()}).encode()
    with pytest.raises(UnprocessableError):
        upload.verify_signature(HOST_KEY, upload.signed_digest([signed]), upload.parse_trailer(doc))


def test_plan_chunk_takes_whole_frames_within_the_limit() -> None:
    body = FILE.body
    sizes = [len(f) for f in FILE.frames]
    assert upload.plan_chunk(body, len(body)) == len(body)  # everything, trailer included
    assert upload.plan_chunk(body, sizes[0] - 1) == 0  # not even one frame fits
    assert upload.plan_chunk(body, sizes[0] + sizes[1] + 3) == sizes[0] + sizes[1]
    assert upload.plan_chunk(body, len(body) - 1) == sum(sizes)  # the trailer only whole
    assert upload.plan_chunk(body[: sizes[0] + 2], 1 << 20) == sizes[0]  # a torn write
    assert upload.plan_chunk(b"", 100) == 0
    with pytest.raises(SealedFormatError):
        upload.plan_chunk(U32.pack(3) + b"abc", 100)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(FILE.body)), limit=st.integers(0, len(FILE.body) + 10))
def test_plan_chunk_output_always_scans(cut: int, limit: int) -> None:
    """Whatever the agent has on disk (a prefix of the frames) and whatever the limit, the
    chunk plan_chunk picks is one scan_chunk accepts, and no whole frame is left behind
    that would have fit."""
    data = FILE.body[:cut]
    n = upload.plan_chunk(data, limit)
    assert 0 <= n <= min(cut, limit)
    if n:
        scan = upload.scan_chunk(data[:n])
        assert scan.frames_end + (0 if scan.signature is None else len(FILE.trailer or b"")) == n
    rest = data[n:]
    if len(rest) >= 4:
        (size,) = U32.unpack_from(rest, 0)
        frame_len = 4 + size if size != 0xFFFFFFFF else len(FILE.trailer or b"")
        assert frame_len > len(rest) or n + frame_len > limit
