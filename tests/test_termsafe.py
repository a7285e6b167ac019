"""Tests of sshaudit.termsafe: what replay drops, what it keeps, and transcripts."""

from __future__ import annotations

import re
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshaudit.termsafe import MAX_SEQUENCE, Sanitizer, Stripper, sanitize, strip_to_text

ST = "\x1b\\"

# Sequences that query the terminal, make it answer or send input, or change it beyond the
# screen. Each must vanish entirely.
DANGEROUS = {
    "OSC 52 clipboard, BEL": "\x1b]52;c;aGVsbG8=\x07",
    "OSC 52 clipboard, ST": "\x1b]52;c;aGVsbG8=" + ST,
    "OSC 52 clipboard query": "\x1b]52;c;?\x07",
    "OSC 52, 8-bit OSC and ST": "\x9d52;c;aGk=\x9c",
    "OSC 0 title": "\x1b]0;owned\x07",
    "OSC 2 title": "\x1b]2;owned" + ST,
    "OSC 4 colour query": "\x1b]4;1;?\x07",
    "OSC 10 colour query": "\x1b]10;?" + ST,
    "OSC 11 background set": "\x1b]11;#ff0000\x07",
    "OSC 50 font query": "\x1b]50;?\x07",
    "OSC 7 cwd": "\x1b]7;file://host/etc\x07",
    "OSC 9 notification": "\x1b]9;hello\x07",
    "OSC 777 notify": "\x1b]777;notify;a;b\x07",
    "OSC 1337 iTerm2 file": "\x1b]1337;File=name=eA==;inline=1:AAAA\x07",
    "OSC 8 alone": "\x1b]8;;https://example.com/" + ST,
    "DECRQSS SGR": "\x1bP$qm" + ST,
    "DECRQSS DECSCL": '\x1bP$q"p' + ST,
    "DECRQSS 8-bit": "\x90$qr\x9c",
    "XTGETTCAP": "\x1bP+q544e" + ST,
    "DECUDK": "\x1bP0|17/17" + ST,
    "sixel": "\x1bPq#0;2;0;0;0#0~~@@" + ST,
    "APC kitty graphics": "\x1b_Gf=100;AAAA" + ST,
    "APC 8-bit": "\x9fhello\x9c",
    "PM": "\x1b^privacy" + ST,
    "PM 8-bit": "\x9eprivacy\x9c",
    "SOS": "\x1bXstart of string" + ST,
    "SOS 8-bit": "\x98sos\x9c",
    "DA1": "\x1b[c",
    "DA1 0": "\x1b[0c",
    "DA1 8-bit": "\x9bc",
    "DA2": "\x1b[>c",
    "DA2 0": "\x1b[>0c",
    "DA3": "\x1b[=c",
    "DSR status": "\x1b[5n",
    "CPR": "\x1b[6n",
    "CPR 8-bit": "\x9b6n",
    "DECXCPR": "\x1b[?6n",
    "DSR printer": "\x1b[?15n",
    "XTQMODKEYS": "\x1b[?4m",
    "DECRQM ANSI": "\x1b[4$p",
    "DECRQM DEC": "\x1b[?2004$p",
    "title report": "\x1b[21t",
    "icon label report": "\x1b[20t",
    "window resize": "\x1b[8;100;300t",
    "window move": "\x1b[3;0;0t",
    "window iconify": "\x1b[2t",
    "window size report": "\x1b[18t",
    "title push": "\x1b[22;0t",
    "XTVERSION": "\x1b[>q",
    "XTVERSION 0": "\x1b[>0q",
    "DECREQTPARM": "\x1b[x",
    "DECREQTPARM 1": "\x1b[1x",
    "DECRQCRA": "\x1b[1;1;1;1;1;1*y",
    "DECID": "\x1bZ",
    "DECID 8-bit": "\x9a",
    "ENQ": "\x05",
    "X10 mouse": "\x1b[?9h",
    "mouse normal": "\x1b[?1000h",
    "mouse highlight": "\x1b[?1001h",
    "mouse button": "\x1b[?1002h",
    "mouse any": "\x1b[?1003h",
    "focus events": "\x1b[?1004h",
    "mouse UTF-8": "\x1b[?1005h",
    "mouse SGR": "\x1b[?1006h",
    "alternate scroll": "\x1b[?1007h",
    "mouse urxvt": "\x1b[?1015h",
    "mouse SGR pixels": "\x1b[?1016h",
    "mouse highlight tracking": "\x1b[1;2;3;4;5T",
    "DECCOLM 132 columns": "\x1b[?3h",
    "DECANM VT52 mode": "\x1b[?2l",
    "KAM keyboard lock": "\x1b[2h",
    "SRM local echo": "\x1b[12l",
    "S8C1T 8-bit controls": "\x1b G",
    "character set switch": "\x1b%@",
    "DECSCL 8-bit": '\x1b[62;1"p',
    "XTMODKEYS": "\x1b[>4;2m",
    "kitty keyboard push": "\x1b[>1u",
    "kitty keyboard query": "\x1b[?u",
    "XTSMGRAPHICS": "\x1b[?1;1S",
    "XTSAVE": "\x1b[?1000s",
    "XTRESTORE": "\x1b[?1000r",
    "media copy": "\x1b[5i",
    "DECLL": "\x1b[1q",
    "huge REP": "\x1b[1000000b",
    "NUL inside CPR": "\x1b[6\x00n",
    "DEL inside CPR": "\x1b[6\x7fn",
    "CAN inside OSC 52": "\x1b]52;c;AA\x18",
    "ST alone": ST,
    "C1 ST alone": "\x9c",
    "other C1": "\x80\x81\x91\x99",
}

# Sequences that draw the screen: kept byte for byte.
HARMLESS = {
    "SGR red": "\x1b[31m",
    "SGR reset": "\x1b[m",
    "SGR truecolor": "\x1b[1;38;2;255;0;10m",
    "SGR colon subparameters": "\x1b[38:5:196m",
    "CUP": "\x1b[10;20H",
    "home": "\x1b[H",
    "ED": "\x1b[2J",
    "EL": "\x1b[K",
    "CUU": "\x1b[5A",
    "CHA": "\x1b[3G",
    "VPA": "\x1b[7d",
    "ICH": "\x1b[3@",
    "DCH": "\x1b[2P",
    "ECH": "\x1b[5X",
    "IL": "\x1b[4L",
    "SU": "\x1b[2S",
    "SD": "\x1b[2T",
    "REP": "\x1b[80b",
    "DECSTBM": "\x1b[1;24r",
    "alternate screen": "\x1b[?1049h",
    "normal screen": "\x1b[?1049l",
    "bracketed paste": "\x1b[?2004h",
    "hide cursor": "\x1b[?25l",
    "autowrap": "\x1b[?7h",
    "application cursor keys": "\x1b[?1h",
    "cursor blink": "\x1b[?12l",
    "synchronized output": "\x1b[?2026h",
    "insert mode": "\x1b[4h",
    "DECSCUSR": "\x1b[2 q",
    "DECSTR": "\x1b[!p",
    "DECSC": "\x1b7",
    "DECRC": "\x1b8",
    "RI": "\x1bM",
    "IND": "\x1bD",
    "line drawing": "\x1b(0",
    "ASCII": "\x1b(B",
    "G1 line drawing": "\x1b)0",
    "DECKPAM": "\x1b=",
    "DECKPNM": "\x1b>",
    "RIS": "\x1bc",
    "DECALN": "\x1b#8",
    "BEL": "\x07",
    "BS": "\x08",
    "TAB": "\t",
    "CR LF": "\r\n",
    "SO SI": "\x0e\x0f",
    "non-ASCII text": "héllo ☃ 漢字 🙂",
}


def feed_all(pieces: list[str]) -> str:
    sanitizer = Sanitizer()
    return "".join(sanitizer.feed(piece) for piece in pieces) + sanitizer.flush()


def every_split(text: str) -> list[list[str]]:
    """The text whole, cut in two at every index, and one character per feed."""
    cuts = [[text[:i], text[i:]] for i in range(1, len(text))]
    return [[text], *cuts, list(text)]


@pytest.mark.parametrize("sequence", DANGEROUS.values(), ids=DANGEROUS.keys())
def test_dangerous_sequence_dropped_however_split(sequence: str) -> None:
    for pieces in every_split("A" + sequence + "B"):
        assert feed_all(pieces) == "AB", pieces


@pytest.mark.parametrize("sequence", HARMLESS.values(), ids=HARMLESS.keys())
def test_harmless_sequence_kept_however_split(sequence: str) -> None:
    text = "A" + sequence + "B"
    for pieces in every_split(text):
        assert feed_all(pieces) == text, pieces


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        # C0 controls inside a sequence are executed there and do not end it (VT500 parser):
        # the LF is kept, the CPR still recognised and dropped.
        ("\x1b[\n6n", "\n"),
        ("\x1b\r[6n", "\r"),
        ("\x1b[3\x081m", "\x08\x1b[31m"),
        # Only the allowed modes of a list are kept.
        ("\x1b[?1049;1000;2004h", "\x1b[?1049;2004h"),
        ("\x1b[?1000;1006l", ""),
        ("\x1b[4;2h", "\x1b[4h"),
        # 8-bit controls come out in their 7-bit form.
        ("\x9b31m", "\x1b[31m"),
        ("\x84\x85\x8d", "\x1bD\x1bE\x1bM"),
        # OSC 8 hyperlink: the link goes, the text stays.
        (f"\x1b]8;;https://evil.example/{ST}click here\x1b]8;;{ST}", "click here"),
        # An ESC inside a string ends it (the VT500 parser does); what follows is parsed.
        ("\x1b]0;title\x1b[31mred", "\x1b[31mred"),
        ("\x1bPq#0\x1b[1mbold", "\x1b[1mbold"),
        # BEL ends an OSC (xterm) but not a DCS, APC, PM or SOS: their data goes on.
        ("\x1bP$q\x07m\x1b\\x", "x"),
        ("\x1b_a\x07b\x1b\\x", "x"),
        ("\x1b]52;c;\x07x", "x"),
        # CAN/SUB cancel a sequence; ESC restarts one.
        ("\x1b[31\x18x", "x"),
        ("\x1b[31\x1b[32mx", "\x1b[32mx"),
        # A non-ASCII character cannot be in a sequence: dropped up to it, then shown.
        ("\x1b[3é", "é"),
        # Lone surrogates (JSON "\\udc80") become U+FFFD so the output always encodes.
        ("a\udc80b", "a\ufffdb"),
        # A parameter after an intermediate is malformed: dropped.
        ("\x1b[1 2q", ""),
    ],
)
def test_examples(given: str, expected: str) -> None:
    assert sanitize(given) == expected
    for pieces in every_split(given):
        assert feed_all(pieces) == expected, pieces


def test_unterminated_sequence_dropped_at_flush() -> None:
    sanitizer = Sanitizer()
    assert sanitizer.feed("ok\x1b[3") == "ok"
    assert sanitizer.flush() == ""
    assert sanitizer.feed("1mx") == "1mx"  # the state was reset: plain text again


def test_overlong_csi_is_dropped_and_skipped_to_its_end() -> None:
    params = "1;" * MAX_SEQUENCE
    text = "A\x1b[" + params + "\n31mB"  # the LF inside is executed
    assert sanitize(text) == "A\nB"
    chunks = [text[i : i + 1000] for i in range(0, len(text), 1000)]
    assert feed_all(chunks) == "A\nB"


def test_endless_sequences_use_bounded_memory() -> None:
    """8 MiB of an OSC, a DCS and a CSI that never end: nothing accumulates."""
    sanitizer = Sanitizer()
    chunks = {"\x1b]52;c;": "QUFB" * 16384, "\x1bP$q": "m" * 65536, "\x1b[": "1;" * 32768}
    tracemalloc.start()
    try:
        for intro, chunk in chunks.items():
            assert sanitizer.feed(intro) == ""
            for _ in range(40):
                assert sanitizer.feed(chunk) == ""
            sanitizer.flush()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak


def test_restore_undoes_what_the_recording_left_changed() -> None:
    sanitizer = Sanitizer()
    sanitizer.feed("\x1b[?1049h\x1b[?25l\x1b[4h\x1b[2;20r\x1b[31m\x1b=\x0e\x1b(0\x1b[5 q")
    restore = sanitizer.restore()
    assert restore.startswith("\x1b[?1049l")  # leave the alternate screen first
    for part in ("\x1b[?25h", "\x1b[4l", "\x1b7\x1b[r\x1b8", "\x1b[m", "\x1b>", "\x0f"):
        assert part in restore
    assert "\x1b(B" in restore
    assert "\x1b[ q" in restore
    assert sanitize(restore) == restore  # itself made of kept sequences only


def test_restore_is_empty_when_the_recording_cleaned_up() -> None:
    sanitizer = Sanitizer()
    sanitizer.feed("\x1b[?1049h\x1b[?25l\x1b[31mvim\x1b[m\x1b[?25h\x1b[?1049l")
    assert sanitizer.restore() == ""
    sanitizer.feed("\x1b[?2004h\x1bc")  # RIS resets everything
    assert sanitizer.restore() == ""
    sanitizer.feed("\x1b[?1049h\x1b[!p")  # DECSTR does not leave the alternate screen
    assert sanitizer.restore() == "\x1b[?1049l"


# -- properties --------------------------------------------------------------------------
FRAGMENTS = [
    *DANGEROUS.values(),
    *HARMLESS.values(),
    *"\x1b\x9b\x9d\x90\x9c\x9f\x9e\x98\x07\x18\x1a\x00\x05\n\r\x7f[]PX^_\\?>=$;: 0123456789",
    *"cntqxyuhlmpTrsSZ",
    "52;",
    "1049",
    "1000",
    "\ud800",
    "é",
]
streams = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=40).map(
    "".join
)

# What a terminal may receive: printable text, the kept C0 controls, whole 7-bit sequences.
SAFE = re.compile(
    "(?:[^\x00-\x06\x10-\x1f\x7f-\x9f\ud800-\udfff]"
    "|\x1b\\[(?P<prefix>[<=>?]?)(?P<args>[0-9:;]*)(?P<inter>[ -/]*)(?P<final>[@-~])"
    "|\x1b[ -/]*[0-~])"
)
QUERY_FINALS = set("cntxyiq")  # DA, DSR, window ops, DECREQTPARM, DECTST, MC, XTVERSION
# Modes that make the terminal send by itself, resize it, lock it or change its parser.
ANSI_FORBIDDEN = {"2", "12"}  # KAM, SRM
DEC_FORBIDDEN = {"2", "3", "9", "1000", "1001", "1002", "1003", "1004", "1005", "1006"}
DEC_FORBIDDEN |= {"1007", "1015", "1016"}


def assert_safe(output: str) -> None:
    pos = 0
    while pos < len(output):
        m = SAFE.match(output, pos)
        assert m is not None, f"unsafe output at {pos}: {output[pos : pos + 20]!r}"
        pos = m.end()
        if m["final"] is None:
            assert m.group() not in ("\x1bZ", "\x1b\\", "\x1b G", "\x1b F"), m.group()
            assert not m.group().startswith("\x1b%"), m.group()
            continue
        inter, final = m["inter"], m["final"]
        assert final not in QUERY_FINALS or (inter == " " and final == "q"), m.group()
        assert (inter, final) != ("$", "p"), m.group()  # DECRQM
        assert m["prefix"] in ("", "?"), m.group()  # > = < : DA2/3, XTMODKEYS, kitty keys...
        if final in "hl":
            modes = DEC_FORBIDDEN if m["prefix"] == "?" else ANSI_FORBIDDEN
            assert not set(m["args"].split(";")) & modes, m.group()
    for forbidden in ("\x1b]", "\x1bP", "\x1b_", "\x1b^", "\x1bX", "\x05"):
        assert forbidden not in output


@settings(max_examples=400, deadline=None)
@given(streams, st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_output_is_always_safe_and_independent_of_splits(text: str, cuts: list[int]) -> None:
    whole = sanitize(text)
    assert_safe(whole)
    bounds = sorted({min(cut, len(text)) for cut in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    assert feed_all(pieces) == whole
    assert sanitize(whole) == whole  # idempotent: what is kept is kept again
    whole.encode()  # never a lone surrogate


# -- transcripts -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("\x1b[01;34mdir\x1b[0m  file\r\n", "dir  file\n"),
        ("\x1b]0;alice@web-1: ~\x07alice@web-1:~$ ls\r\n", "alice@web-1:~$ ls\n"),
        ("progress  10%\rprogress 100%\r\ndone\r\n", "progress 100%\ndone\n"),
        ("hx\x08ello\r\n", "hello\n"),  # BS then overwrite
        ("abc\x08 \x08\x08 \x08\r\n", "a\n"),  # erase the way shells do: BS SP BS
        ("$ cat x\r$ \x1b[Kls\r\n", "$ ls\n"),  # readline redraws: CR then EL
        ("abcdef\x1b[3D\x1b[1P\r\n", "abcef\n"),  # CUB then DCH
        ("ab\x1b[3Cc\n", "ab   c\n"),  # CUF past the end pads
        ("a\tb\x07\x0e\x0fc\x0bd", "a\tbc\nd"),  # BEL SO SI go, VT is a line feed
        ("x\x1bP$qm\x1b\\y\x00\x05z", "xyz"),
        ("\x1b[?1049h\x1b[H\x1b[2Jvim\x1b[?1049l", "vim"),
        ("bad \udc80 byte", "bad \ufffd byte"),
    ],
)
def test_strip_to_text(given: str, expected: str) -> None:
    assert strip_to_text(given) == expected


def test_stripper_streams_whole_lines() -> None:
    stripper = Stripper()
    assert stripper.feed("one\r\ntw") == "one\n"
    assert stripper.feed("o\x1b[3") == ""
    assert stripper.feed("1m three\r\n") == "two three\n"
    assert stripper.feed("last") == ""
    assert stripper.flush() == "last"


@settings(max_examples=300, deadline=None)
@given(streams, st.integers(min_value=0, max_value=400))
def test_transcript_has_only_text_and_is_split_independent(text: str, cut: int) -> None:
    whole = strip_to_text(text)
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]", whole), repr(whole)
    stripper = Stripper()
    assert stripper.feed(text[:cut]) + stripper.feed(text[cut:]) + stripper.flush() == whole
