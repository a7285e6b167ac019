"""Fuzzing the readers of untrusted input: ``SealedReader`` and the asciicast ``Decoder``.

Whatever the bytes, nothing but a subclass of ``SSHAuditError`` may escape (an escaping
exception fails the test by itself). Beyond that, for mutated copies of a valid sealed
file: whatever the project reader accepts is authentic (a prefix of the original
plaintext, the whole of it when the signature is valid) and is exactly what the
independent implementation of FORMAT.md reads from the same bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

import independent_format as ind
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from sshaudit.asciicast import Code, Decoder, Event
from sshaudit.errors import AsciicastError, SSHAuditError
from sshaudit.keys import AuditorPrivateKey
from sshaudit.sealed import Completeness, ReadResult, SealedReader, SignatureStatus

VECTORS = Path(__file__).parent / "vectors"
KEY1 = AuditorPrivateKey.from_text((VECTORS / "auditor1.key").read_bytes())
CAST = (VECTORS / "session.cast").read_bytes()
NAMES = ["session", "unsigned", "truncated", "torn", "tampered", "reordered", "header-tampered"]
FILES = {name: (VECTORS / f"{name}.sealed").read_bytes() for name in NAMES}
SESSION = FILES["session"]
HEADER_END = 14 + struct.unpack(">I", SESSION[10:14])[0]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pieces(data: bytes, chunks: Sequence[int]) -> list[bytes]:
    out, pos = [], 0
    for size in chunks:
        out.append(data[pos : pos + size])
        pos += size
    return [*out, data[pos:]]


def read(data: bytes, chunks: Sequence[int] = ()) -> tuple[bytes, ReadResult] | None:
    """The project reader's verdict; None when it refused the file (with its own error)."""
    reader = SealedReader([KEY1])
    try:
        plain = b"".join(reader.feed(piece) for piece in pieces(data, chunks))
        return plain, reader.finish()
    except SSHAuditError:
        return None


CHUNKS = st.lists(st.integers(1, 600), max_size=6)


# ---------------------------------------------------------------- SealedReader


@FUZZ
@given(st.binary(max_size=3000), CHUNKS)
def test_sealed_reader_random_bytes(data: bytes, chunks: list[int]) -> None:
    assert read(data, chunks) is None  # random bytes are never a sealed file


@FUZZ
@given(st.binary(max_size=2000), CHUNKS)
@example(struct.pack(">I", 100_000) + b"[" * 100_000, [])
@example(struct.pack(">I", 0xFFFFFFFF), [])
def test_sealed_reader_after_the_magic(rest: bytes, chunks: list[int]) -> None:
    assert read(ind.MAGIC + rest, chunks) is None


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(list(json.loads(SESSION[14:HEADER_END]))), JSONISH), CHUNKS)
def test_sealed_reader_odd_header_values(changes: dict[str, object], chunks: list[int]) -> None:
    """The vector's header with some fields set to any JSON value, frames kept."""
    raw = json.dumps({**json.loads(SESSION[14:HEADER_END]), **changes}).encode()
    data = ind.MAGIC + ind.u32(len(raw)) + raw + SESSION[HEADER_END:]
    result = read(data, chunks)
    if result is not None:  # the header bytes changed, so no frame may open
        assert result[0] == b"" and result[1].completeness is Completeness.TRUNCATED


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    """A vector file changed by bit flips, a cut, an insertion, or a spliced length field."""
    name = draw(st.sampled_from(NAMES))
    data = bytearray(FILES[name])
    # Half the changes fall after the header: most header changes are refused at once.
    lo = draw(st.sampled_from([0, 14 + struct.unpack(">I", data[10:14])[0]]))
    kind = draw(st.sampled_from(["flip", "cut", "insert", "splice", "mixed"]))
    if kind in ("flip", "mixed"):
        for pos in draw(st.lists(st.integers(lo, len(data) - 1), min_size=1, max_size=4)):
            data[pos] ^= 1 << draw(st.integers(0, 7))
    if kind in ("splice", "mixed"):
        fields = [10, *ind.frame_offsets(FILES[name])]
        if FILES[name].rfind(b"\xff\xff\xff\xff") > fields[-1]:
            fields.append(FILES[name].rfind(b"\xff\xff\xff\xff") + 4)  # the trailer's length
        at = draw(st.sampled_from(fields))
        old = struct.unpack(">I", FILES[name][at : at + 4])[0]
        special = [0, 1, 15, 16, 17, 0xFFFFFFFF, 0xFFFFFFFE, (1 << 20) + 16, (1 << 20) + 17]
        value = draw(st.sampled_from([*special, old - 1, old + 1]) | st.integers(0, 2**32 - 1))
        data[at : at + 4] = struct.pack(">I", value % 2**32)
    if kind in ("insert", "mixed"):
        at = draw(st.integers(lo, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=40))
    if kind in ("cut", "mixed"):
        data = data[: draw(st.integers(lo, len(data)))]
    return name, bytes(data)


@settings(max_examples=1000, deadline=None)
@given(mutations(), CHUNKS)
def test_sealed_reader_mutated_vectors(mutated: tuple[str, bytes], chunks: list[int]) -> None:
    name, data = mutated
    result = read(data, chunks)
    event(f"{name}: " + ("refused" if result is None else result[1].completeness.value))
    if result is None:
        return
    plain, outcome = result
    assert CAST.startswith(plain), "a changed file gave plaintext that was never sealed"
    if outcome.signature is SignatureStatus.VALID:
        assert plain == CAST and outcome.completeness is Completeness.COMPLETE
    status = outcome.signature.value
    assert ind.open_file(data, KEY1.raw) == (
        plain, outcome.completeness is Completeness.COMPLETE, status
    )  # fmt: skip


# ---------------------------------------------------------------- asciicast Decoder

HEAD = b'{"version": 2, "width": 80, "height": 24}\n'


def decode(data: bytes, chunks: Sequence[int]) -> list[object] | None:
    decoder = Decoder()
    try:
        items: list[object] = []
        for piece in pieces(data, chunks):
            items += decoder.feed(piece)
        return items + list(decoder.close())
    except AsciicastError:
        return None


def check_events(items: list[object]) -> None:
    times = [item.time for item in items if isinstance(item, Event)]
    assert times == sorted(times) and all(t >= 0 for t in times)
    for item in items:
        if isinstance(item, Event) and item.code is Code.RESIZE:
            cols, _, rows = item.data.partition("x")
            assert cols.isdecimal() and rows.isdecimal()


@FUZZ
@given(st.binary(max_size=2000), CHUNKS)
def test_decoder_random_bytes(data: bytes, chunks: list[int]) -> None:
    for whole in (data, HEAD + data):
        items = decode(whole, chunks)
        if items is not None:
            check_events(items)


TOKENS = st.sampled_from(
    ['"o"', '"i"', '"r"', '"m"', '"x"', '"80x24"', '"\\u00e9"', '"\\ud800"', "NaN",
     "Infinity", "-Infinity", "1e999", "-0", "0.5", "3", "1" + "0" * 400, "true",
     "null", "[", "]", "{", "}", ",", ":", '"version"', "2", " ", "\\", '"'],
)  # fmt: skip


@st.composite
def jsonish_line(draw: st.DrawFn) -> str:
    """Half the time an array of odd members (close to an event), else token soup."""
    if draw(st.booleans()):
        parts = draw(st.lists(JSONISH.map(json.dumps) | TOKENS, max_size=4))
        return "[" + ", ".join(parts) + "]"
    return "".join(draw(st.lists(TOKENS, max_size=12)))


@FUZZ
@given(st.lists(jsonish_line(), max_size=12), st.booleans(), CHUNKS)
@example(["[" * 50_000], True, [])
@example(["[1" + "0" * 400 + ', "o", "x"]'], True, [])
def test_decoder_jsonish_lines(lines: list[str], header: bool, chunks: list[int]) -> None:
    data = (HEAD if header else b"") + "\n".join(lines).encode("utf-8", "surrogatepass")
    items = decode(data, chunks)
    if items is not None:
        check_events(items)
