"""asciicast v2 encoder and decoder (sshaudit.asciicast), and Debian's asciinema reading
what the encoder writes (issue 2 acceptance: ``asciinema cat`` accepts every .cast).

Spec: https://docs.asciinema.org/manual/asciicast/v2/ (one JSON header line, then one JSON
array ``[time, code, data]`` per line).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshaudit.asciicast import (
    MAX_LINE,
    Code,
    Decoder,
    Encoder,
    Event,
    Header,
    decode_all,
    format_time,
)
from sshaudit.errors import AsciicastError

VECTORS = Path(__file__).parent / "vectors"
HEAD = b'{"version": 2, "width": 80, "height": 24}\n'
TEXT = "plain ascii, héllo, ☃ snowman, 𝄞 clef, 日本語, e\u0301"


def split_lines(data: bytes) -> list[bytes]:
    """Lines as asciicast defines them: split on LF only (not U+2028 or U+0085)."""
    assert data.endswith(b"\n") or not data
    return data.split(b"\n")[:-1]


def events(data: bytes) -> list[list[Any]]:
    return [json.loads(line) for line in split_lines(data)]


def joined(lines: list[list[Any]], code: str) -> str:
    return "".join(e[2] for e in lines if e[1] == code)


def replaced(data: bytes) -> tuple[str, bytes]:
    """Oracle: the text with every byte that is not UTF-8 as one U+FFFD (PEP 383 maps each
    such byte to one lone surrogate), and those bytes."""
    text = data.decode("utf-8", "surrogateescape")
    bad = bytes(ord(c) - 0xDC00 for c in text if 0xDC80 <= ord(c) <= 0xDCFF)
    return re.sub("[\udc80-\udcff]", "\ufffd", text), bad


def feed_cut(enc: Encoder, data: bytes, cuts: Sequence[int], t: float = 1.0) -> bytes:
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    out = b"".join(enc.output(t, data[a:b]) for a, b in itertools.pairwise(bounds))
    return out + enc.flush(t)


# ---------------------------------------------------------------- encoder


def test_header_line_fields_and_sshaudit_object() -> None:
    extra = {"sshaudit": {"session_id": "0b9f8c1e", "user": "alice", "host_id": "web-1"}}
    header = Header(
        width=120, height=40, timestamp=1795310884, env={"TERM": "xterm", "SHELL": "/bin/sh"},
        command="bash -l", title="alice@web-1 ☃", idle_time_limit=2.5, extra=extra,
    )  # fmt: skip
    line = Encoder(header).header_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "version": 2, "width": 120, "height": 40, "timestamp": 1795310884,
        "env": {"TERM": "xterm", "SHELL": "/bin/sh"}, "command": "bash -l",
        "title": "alice@web-1 ☃", "idle_time_limit": 2.5, **extra,
    }  # fmt: skip
    parsed, _ = decode_all(line)
    assert parsed == header and parsed.extra["sshaudit"]["user"] == "alice"


def test_header_minimal_and_extra_cannot_override() -> None:
    line = Encoder(Header(80, 24, extra={"version": 3, "width": 1, "x": None})).header_line()
    assert json.loads(line) == {"version": 2, "width": 80, "height": 24, "x": None}
    for w, h in ((0, 24), (80, 0), (-1, 5)):
        with pytest.raises(ValueError, match="positive"):
            Encoder(Header(w, h))


@pytest.mark.parametrize(
    ("t", "text"),
    [(0, "0.0"), (1.5, "1.5"), (0.000001, "0.000001"), (1.0000004, "1.0"),
     (1.0000006, "1.000001"), (123456.789012, "123456.789012"), (1e-7, "0.0"),
     (2.0, "2.0"), (86400 * 365 * 10 + 0.25, "315360000.25")],
)  # fmt: skip
def test_format_time(t: float, text: str) -> None:
    assert format_time(t) == text
    assert "e" not in text.lower()


def test_times_microseconds_and_never_back() -> None:
    enc = Encoder(Header(80, 24))
    times = [0.1234564, 0.1234566, 5.0, 3.0, 4.9999999, 6.0000001, 6.5]
    out = b"".join(enc.output(t, b"x") for t in times)
    stamps = [re.match(rb"\[([0-9.]+), ", line)[1] for line in split_lines(out)]  # type: ignore[index]
    assert stamps == [b"0.123456", b"0.123457", b"5.0", b"5.0", b"5.0", b"6.0", b"6.5"]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            enc.output(bad, b"x")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e7, allow_nan=False), min_size=1, max_size=30))
def test_times_are_the_running_maximum(times: list[float]) -> None:
    enc = Encoder(Header(80, 24))
    got = [e[0] for e in events(b"".join(enc.marker(t, "m") for t in times))]
    assert got == sorted(got)
    for i, t in enumerate(got):
        assert abs(t - max(times[: i + 1])) <= 5e-7 * max(1.0, t / 1e6)


def test_utf8_cut_at_every_position() -> None:
    data = TEXT.encode()
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1, 3):
            out = feed_cut(Encoder(Header(80, 24)), data, [i, j])
            lines = events(out)
            assert joined(lines, "o") == TEXT, (i, j)
            assert not [e for e in lines if e[1] == "m"], (i, j)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.integers(0, 400), max_size=8))
def test_any_text_cut_anywhere_comes_back(text: str, cuts: list[int]) -> None:
    data = text.encode("utf-8", "surrogatepass")
    want, bad = replaced(data)  # st.text() may hold lone surrogates: not UTF-8 either
    lines = events(feed_cut(Encoder(Header(80, 24)), data, cuts))
    assert joined(lines, "o") == want
    assert bool(bad) == any(e[1] == "m" for e in lines)


@pytest.mark.parametrize(
    ("data", "text", "label"),
    [
        (b"a\xffb", "a\ufffdb", "1 bytes: ff"),
        (b"\xc3(", "\ufffd(", "1 bytes: c3"),
        (b"\xed\xa0\x80!", "\ufffd\ufffd\ufffd!", "3 bytes: ed a0 80"),  # a UTF-16 surrogate
        (b"\xf4\x90\x80\x80", "\ufffd" * 4, "4 bytes: f4 90 80 80"),  # past U+10FFFF
        (b"\xc0\xaf/", "\ufffd\ufffd/", "2 bytes: c0 af"),  # overlong "/"
        (b"\xff" * 100, "\ufffd" * 100, "100 bytes: " + " ".join(["ff"] * 64) + " ..."),
    ],
)
def test_invalid_bytes_are_replaced_and_named(data: bytes, text: str, label: str) -> None:
    enc = Encoder(Header(80, 24))
    lines = events(enc.output(2.5, data) + enc.flush(3.0))
    assert lines == [[2.5, "o", text], [2.5, "m", f"sshaudit: invalid UTF-8 in o: {label}"]]
    assert enc.invalid_bytes[Code.OUTPUT] == len(data) - len(text.replace("\ufffd", ""))


def test_invalid_bytes_split_across_reads_and_at_the_end() -> None:
    enc = Encoder(Header(80, 24))
    # e2 may still start a character: it is held back until the next read says
    assert events(enc.output(1, b"ok \xe2")) == [[1.0, "o", "ok "]]
    assert events(enc.output(2, b"(")) == [
        [2.0, "o", "\ufffd("], [2.0, "m", "sshaudit: invalid UTF-8 in o: 1 bytes: e2"]
    ]  # fmt: skip
    assert enc.output(3, b"\xe2\x82") == b""
    assert enc.input(3, b"typed \xfe") != b""
    assert events(enc.flush(4)) == [
        [4.0, "o", "\ufffd\ufffd"], [4.0, "m", "sshaudit: invalid UTF-8 in o: 2 bytes: e2 82"]
    ]  # fmt: skip
    assert enc.invalid_bytes == {Code.OUTPUT: 3, Code.INPUT: 1}
    assert enc.flush(5) == b""


def test_input_stream_is_separate() -> None:
    enc = Encoder(Header(80, 24))
    out = enc.output(1, b"\xc3") + enc.input(1, b"\xa9") + enc.output(2, b"\xa9")
    assert events(out + enc.flush(3)) == [
        [1.0, "i", "\ufffd"], [1.0, "m", "sshaudit: invalid UTF-8 in i: 1 bytes: a9"],
        [2.0, "o", "é"],
    ]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
def test_any_bytes_cut_anywhere(data: bytes, cuts: list[int]) -> None:
    want, bad = replaced(data)
    out = feed_cut(Encoder(Header(80, 24)), data, cuts)
    lines = events(out)
    assert joined(lines, "o") == want
    assert [[e.time, e.code.value, e.data] for e in decode_all(HEAD + out)[1]] == lines
    named = b""
    for e in lines:
        if e[1] == "m":
            count, _, shown = (
                e[2].removeprefix("sshaudit: invalid UTF-8 in o: ").partition(" bytes: ")
            )
            assert int(count) >= 1
            named += bytes.fromhex(shown.removesuffix(" ..."))
    if len(bad) <= 64:
        assert named == bad


def test_resize_and_marker_events() -> None:
    enc = Encoder(Header(80, 24))
    out = enc.resize(1.0, 120, 40) + enc.marker(2.0, 'checkpoint "☃"\n\x1b[31m')
    assert events(out) == [[1.0, "r", "120x40"], [2.0, "m", 'checkpoint "☃"\n\x1b[31m']]
    _, evs = decode_all(HEAD + out)
    assert evs == [Event(1.0, Code.RESIZE, "120x40"), Event(2.0, Code.MARKER, evs[1].data)]


def test_control_characters_and_line_separators_stay_on_one_line() -> None:
    text = "\x1b[31mred\x1b[0m\r\n\x00\x07\x7f \u2028 \u2029 \x85 end"
    enc = Encoder(Header(80, 24))
    out = enc.output(1, text.encode())
    assert len(split_lines(out)) == 1
    assert decode_all(HEAD + out)[1] == [Event(1.0, Code.OUTPUT, text)]


# ---------------------------------------------------------------- decoder

BAD_CASTS: list[tuple[bytes, int, str]] = [
    (b"", 0, "empty file"),
    (b"\n \n", 0, "no header"),
    (b"not json\n", 1, "not valid JSON"),
    (b"[1, 2]\n", 1, "header must be a JSON object"),
    (b'{"version": 1, "width": 80, "height": 24}\n', 1, "unsupported version"),
    (b'{"version": 2.0, "width": 80, "height": 24}\n', 1, "unsupported version"),
    (b'{"version": "2", "width": 80, "height": 24}\n', 1, "unsupported version"),
    (b'{"version": 2, "width": 0, "height": 24}\n', 1, "'width' must be a positive integer"),
    (b'{"version": 2, "width": "80", "height": 24}\n', 1, "'width'"),
    (b'{"version": 2, "width": true, "height": 24}\n', 1, "'width'"),
    (b'{"version": 2, "width": 80}\n', 1, "'height' must be a positive integer"),
    (b'{"version": 2, "width": 80, "height": 24, "timestamp": "x"}\n', 1, "'timestamp'"),
    (b'{"version": 2, "width": 80, "height": 24, "env": {"A": 1}}\n', 1, "'env'"),
    (b'{"version": 2, "width": 80, "height": 24, "env": []}\n', 1, "'env'"),
    (b'{"version": 2, "width": 80, "height": 24, "title": 5}\n', 1, "'title'"),
    (b'{"version": 2, "width": 80, "height": 24, "command": []}\n', 1, "'command'"),
    (b'{"version": 2, "width": 80, "height": 24, "idle_time_limit": "1"}\n', 1, "idle_time"),
    (b'{"version": 2, "width": 80, "height": 24, "idle_time_limit": NaN}\n', 1, "idle_time"),
    (
        b'{"version": 2, "width": 80, "height": 24, "idle_time_limit": 1' + b"0" * 400 + b"}\n",
        1,
        "idle_time",
    ),
    (HEAD + b"\xff\n", 2, "not valid UTF-8"),
    (HEAD + b'[1, "o"]\n', 2, "[time, code, data]"),
    (HEAD + b'{"t": 1}\n', 2, "[time, code, data]"),
    (HEAD + b'[1, "o", "x", 4]\n', 2, "[time, code, data]"),
    (HEAD + b'[-1, "o", "x"]\n', 2, "non-negative number"),
    (HEAD + b'["1", "o", "x"]\n', 2, "non-negative number"),
    (HEAD + b'[true, "o", "x"]\n', 2, "non-negative number"),
    (HEAD + b'[NaN, "o", "x"]\n', 2, "non-negative number"),
    (HEAD + b'[Infinity, "o", "x"]\n', 2, "non-negative number"),
    (HEAD + b'[1e999, "o", "x"]\n', 2, "non-negative number"),
    (HEAD + b"[1" + b"0" * 400 + b', "o", "x"]\n', 2, "non-negative number"),
    (HEAD + b'[2, "o", "x"]\n[1.5, "o", "y"]\n', 3, "goes back"),
    (HEAD + b'[1, "z", "x"]\n', 2, "unknown event code"),
    (HEAD + b'[1, ["o"], "x"]\n', 2, "unknown event code"),
    (HEAD + b'[1, "o", 5]\n', 2, "event data must be a string"),
    (HEAD + b'[1, "o", null]\n', 2, "event data must be a string"),
    (HEAD + b'[1, "r", "80by24"]\n', 2, "resize data"),
    (HEAD + b'[1, "r", "\xef\xbc\x98\xef\xbc\x90x24"]\n', 2, "resize data"),  # full-width 80
    (HEAD + b'[1, "r", "x"]\n', 2, "resize data"),
    (HEAD + b"[" * 100_000 + b"\n", 2, "nested too deeply"),
    (HEAD + b"\n\n" + b"oops\n", 4, "not valid JSON"),  # blank lines are counted
    (HEAD + b'[1, "o", "x"]', 0, ""),  # a good last line without its newline: accepted
]


@pytest.mark.parametrize(("data", "line", "reason"), BAD_CASTS)
def test_decoder_rejects_with_line_and_reason(data: bytes, line: int, reason: str) -> None:
    for piece in (len(data) or 1, 1):
        if piece == 1 and len(data) > 10_000:
            continue
        decoder = Decoder()
        try:
            for i in range(0, len(data), piece):
                decoder.feed(data[i : i + piece])
            decoder.close()
        except AsciicastError as exc:
            assert reason, f"rejected a good file: {exc}"
            assert (exc.line, reason in exc.reason) == (line, True), str(exc)
            where = f"line {line}: " if line else ""
            assert str(exc) == f"asciicast: {where}{exc.reason}"
            with pytest.raises(AsciicastError) as again:  # a failed decoder stays failed
                decoder.feed(b'[9, "o", "x"]\n')
            assert again.value.line == exc.line
        else:
            assert not reason, "accepted a bad file"


def test_decoder_limits_line_length() -> None:
    decoder = Decoder()
    decoder.feed(HEAD)
    decoder.feed(b"[" + b" " * (MAX_LINE - 1))  # exactly MAX_LINE buffered: still fine
    with pytest.raises(AsciicastError, match="line 2: line longer than"):
        decoder.feed(b" ")


def test_decoder_accepts_the_vector_cast() -> None:
    data = (VECTORS / "session.cast").read_bytes()
    header, evs = decode_all(data)
    assert (header.width, header.height, header.timestamp) == (80, 24, 1795310884)
    assert header.env["TERM"] == "xterm-256color" and header.title == "alice@web-1"
    assert len(evs) == len(split_lines(data)) - 1 == 11
    assert evs[7] == Event(2.0, Code.RESIZE, "120x40")
    assert evs[8] == Event(2.5, Code.MARKER, "checkpoint")
    assert "ho héllo ☃\r" in [e.data for e in evs if e.code is Code.INPUT]
    for cut in range(len(data) + 1):  # fed in two pieces, cut anywhere
        decoder = Decoder()
        items = decoder.feed(data[:cut]) + decoder.feed(data[cut:]) + decoder.close()
        assert items == [header, *evs]


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("o"), st.floats(0, 100), st.binary(max_size=40)),
        st.tuples(st.just("i"), st.floats(0, 100), st.binary(max_size=10)),
        st.tuples(
            st.just("r"), st.floats(0, 100), st.tuples(st.integers(1, 999), st.integers(1, 999))
        ),
        st.tuples(st.just("m"), st.floats(0, 100), st.text(max_size=20)),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_encoder_to_decoder_round_trip(ops: list[tuple[str, float, Any]]) -> None:
    enc = Encoder(Header(100, 30, extra={"sshaudit": {"n": len(ops)}}))
    out = enc.header_line()
    streams: dict[str, bytes] = {"o": b"", "i": b""}
    sizes: list[str] = []
    labels: list[str] = []
    for code, t, arg in ops:
        if code in "oi":
            out += (enc.output if code == "o" else enc.input)(t, arg)
            streams[code] += arg
        elif code == "r":
            out += enc.resize(t, *arg)
            sizes.append(f"{arg[0]}x{arg[1]}")
        else:
            out += enc.marker(t, arg)
            labels.append(arg)
    out += enc.flush(100.0)
    header, evs = decode_all(out)
    assert header.extra == {"sshaudit": {"n": len(ops)}}
    got = {c: [e.data for e in evs if e.code.value == c] for c in "oirm"}
    assert "".join(got["o"]) == replaced(streams["o"])[0]
    assert "".join(got["i"]) == replaced(streams["i"])[0]
    assert got["r"] == sizes
    ours = "sshaudit: invalid UTF-8"
    assert [m for m in got["m"] if not m.startswith(ours)] == [
        m for m in labels if not m.startswith(ours)
    ]
    times = [e.time for e in evs]
    assert times == sorted(times)


# ---------------------------------------------------------------- asciinema cat (acceptance)


def asciinema_cat(path: Path) -> subprocess.CompletedProcess[bytes]:
    """Run Debian's ``asciinema cat`` (2.x needs a terminal: ``script`` gives it a pty)."""
    asciinema, script = shutil.which("asciinema"), shutil.which("script")
    if asciinema is None or script is None:
        pytest.skip(
            "ASCIINEMA ACCEPTANCE NOT RUN: `asciinema` or `script` is missing "
            "(apt packages asciinema and util-linux; scripts/bootstrap installs them)"
        )
    command = f"{shlex.quote(asciinema)} cat {shlex.quote(str(path))}"
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm"}
    return subprocess.run(
        [script, "-qec", command, "/dev/null"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def cast_plain(enc: Encoder) -> tuple[bytes, str]:
    out = enc.output(0.1, b"$ echo hello\r\n") + enc.output(0.2, b"hello\r\n$ ")
    return out, "$ echo hello\r\nhello\r\n$ "


def cast_unicode_split(enc: Encoder) -> tuple[bytes, str]:
    data = TEXT.encode()
    return b"".join(enc.output(i / 100, data[i : i + 1]) for i in range(len(data))), TEXT


def cast_invalid(enc: Encoder) -> tuple[bytes, str]:
    out = enc.output(1, b"ok \xff\xfe then \xe2\x82") + enc.output(2, b" done \xe2\x98")
    return out + enc.flush(3), "ok \ufffd\ufffd then \ufffd\ufffd done \ufffd\ufffd"


def cast_resize_markers_input(enc: Encoder) -> tuple[bytes, str]:
    last = "\x1b[1mbold\x1b[0m \u2028 \x85 end"  # line separators other than LF, too
    out = enc.input(0.5, b"ls\r") + enc.output(0.6, b"ls\r\nfile\r\n")
    out += enc.resize(1.0, 132, 50) + enc.marker(1.5, "checkpoint ☃")
    out += enc.input(2, b"\x1b[A") + enc.output(3.0, last.encode())
    return out, "ls\r\nfile\r\n" + last


def cast_clock_steps_back(enc: Encoder) -> tuple[bytes, str]:
    return enc.output(5, b"first ") + enc.output(2, b"second ") + enc.output(4, b"third"), (
        "first second third"
    )


def cast_empty(enc: Encoder) -> tuple[bytes, str]:
    return enc.flush(0), ""


CASTS = [cast_plain, cast_unicode_split, cast_invalid, cast_resize_markers_input,
         cast_clock_steps_back, cast_empty]  # fmt: skip


@pytest.mark.parametrize("make", CASTS, ids=[f.__name__ for f in CASTS])
def test_asciinema_cat_accepts_what_the_encoder_writes(make: Any, tmp_path: Path) -> None:
    header = Header(
        width=100, height=30, timestamp=1795310884, env={"TERM": "xterm-256color"},
        title="alice@web-1 ☃", idle_time_limit=2.0,
        extra={"sshaudit": {"session_id": "0b9f8c1e", "host_id": "web-1", "user": "alice"}},
    )  # fmt: skip
    enc = Encoder(header)
    body, text = make(enc)
    path = tmp_path / "rec.cast"
    path.write_bytes(enc.header_line() + body)
    decode_all(path.read_bytes())  # our own decoder agrees
    result = asciinema_cat(path)
    shown = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, shown + result.stderr.decode(errors="replace")
    assert shown.replace("\r", "") == text.replace("\r", "")


def test_asciinema_cat_rejects_a_bad_cast(tmp_path: Path) -> None:
    """The acceptance check can fail: asciinema refuses a file that is not asciicast v2."""
    path = tmp_path / "bad.cast"
    path.write_bytes(b'{"version": 3, "term": {"cols": 80}}\n[0.1, "o", "x"]\n')
    assert asciinema_cat(path).returncode != 0
