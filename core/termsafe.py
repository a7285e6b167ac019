"""Terminal output made safe to replay, or reduced to readable text. Sans-IO, standard library only.

A recording is written by whoever controlled the recorded session, so replaying it is running
their bytes on the auditor's terminal. :class:`Sanitizer` passes on what draws the screen and
drops what can query, answer back, reconfigure or leave the auditor's terminal; :class:`Stripper`
(and :func:`strip_to_text`) keep only the text, for transcripts.

The parser follows the DEC/ANSI parser model that xterm and VTE implement (states of ECMA-48
section 5 and the "anywhere" transitions of the VT500 state diagram): inside an escape or
control sequence, C0 controls are executed and do not end it; CAN and SUB cancel it; ESC starts a
new one; the 8-bit C1 controls U+0080..U+009F are read as their 7-bit ``ESC Fe`` forms
(ECMA-48 5.3), so ``U+009B 6 n`` is handled exactly like ``ESC [ 6 n``.

Invariants of :class:`Sanitizer` output (whatever the input and however it is split):

- it contains only: printable characters; the C0 controls BEL BS HT LF VT FF CR SO SI; and whole
  sequences from an allowlist, re-written in their 7-bit form (``ESC [`` for CSI) with no control
  inside. Every sequence emitted is complete, so the auditor's terminal is back in its ground
  state after each one, and a sequence split between two events still cannot be smuggled;
- no C1 control, DEL, ENQ (answerback, ECMA-48 8.3.44) or other C0 control; no lone surrogate
  (each becomes U+FFFD, so the output always encodes as UTF-8);
- no control string at all: OSC (all of them, see below), DCS (DECRQSS ``ESC P $ q``, Sixel,
  XTGETTCAP...), APC, PM, SOS are dropped with their content;
- no query: DA1/DA2/DA3 (``CSI c``, ``CSI > c``, ``CSI = c``), DSR/CPR (``CSI n``, ``CSI ? n``),
  DECRQM (``CSI $ p``), window operations and reports (``CSI t``), XTVERSION (``CSI > q``),
  DECREQTPARM (``CSI x``), DECID (``ESC Z``), DECRQCRA... : the CSI allowlist names only
  sequences that draw; everything else is dropped;
- no mode that makes the terminal send input by itself: mouse tracking (DEC modes 9, 1000-1006,
  1015, 1016), focus events (1004), alternate scroll (1007); no mode that resizes it (DECCOLM 3),
  locks its keyboard (KAM), changes its parser (DECANM 2: VT52; ``ESC SP G``: 8-bit controls;
  ``ESC %``: character set) or its keyboard protocol (``CSI > m``, ``CSI > u``);
- nothing is buffered without bound: a sequence is held (to be emitted whole) only up to
  MAX_SEQUENCE characters, after which it is dropped and skipped to its end (the same whether
  it arrived whole or in pieces); control strings are never buffered: nothing of them is kept.

Decisions: every OSC is dropped, set-title (OSC 0/1/2) included: the window title belongs to the
auditor's desktop rather than to the screen being replayed, and it is what title-report attacks
(CVE-2003-0063) echo back. OSC 8 hyperlinks lose the link and keep their text (the text is
outside the OSC). Input-mode switches that cannot make the terminal send anything by themselves
are kept (DECCKM ``?1``, DECKPAM ``ESC =``, bracketed paste ``?2004``) since full-screen programs
set them; :meth:`Sanitizer.restore` undoes them, and every other mode the replay left changed.

References: ECMA-48 5th ed. (1991); xterm "Control Sequences" (ctlseqs, invisible-island.net);
P. Williams, "A parser for DEC's ANSI-compatible video terminals" (vt100.net/emu/dec_ansi_parser).
"""

from __future__ import annotations

import re
from enum import Enum

MAX_SEQUENCE = 4096  # characters an unfinished escape or control sequence may hold
MAX_LINE = 64 * 1024  # characters of one transcript line held before it is written out as is

ESC = "\x1b"
_CANCEL = "\x18\x1a"  # CAN and SUB: cancel the sequence in progress (ECMA-48 8.3.6, 8.3.148)

# Printable text and the C0 controls kept on the replayed screen: BEL BS HT LF VT FF CR SO SI
# (0x07-0x0F). Copied in bulk: this is nearly all of a recording.
_TEXT = re.compile("[^\x00-\x06\x10-\x1f\x7f-\x9f\ud800-\udfff]+")
_DROPPED_C0 = re.compile("[\x00-\x06\x10-\x1a\x1c-\x1f\x7f]+")  # everything C0 but ESC, and DEL
_KEPT_C0 = re.compile("[\x07-\x0f]+")
_ANY_C0 = re.compile("[\x00-\x1f\x7f]")
# A whole CSI with no control inside: the common case, one match (ECMA-48 5.4: parameter
# bytes 0x30-0x3F, intermediate bytes 0x20-0x2F, final byte 0x40-0x7E).
_CLEAN_CSI = re.compile("\x1b\\[([0-?]*)([ -/]*)([@-~])")
# What may come between the start of a sequence and its final byte: C0 controls but CAN, SUB
# and ESC (executed in place), DEL (ignored), intermediates (and parameters, for CSI).
_ESC_BODY = re.compile("[\x00-\x17\x19\x1c-\x1f -/\x7f]*")
_CSI_BODY = re.compile("[\x00-\x17\x19\x1c-\x1f -?\x7f]*")
_CSI_PARTS = re.compile("([0-?]*)([ -/]*)")
_CSI_PARAMS = re.compile("([<=>?]?)([0-9:;]*)")
_HUGE_NUMBER = re.compile("[0-9]{6}")  # e.g. REP (CSI b) 10**9 times: no drawing needs it
# Ends of control strings: ST (ESC \ or U+009C), or any ESC, CAN, SUB, C1 (VT500 "anywhere"
# transitions); BEL also ends an OSC (xterm ctlseqs, "Operating System Commands").
_STRING_END = re.compile("[\x18\x1a\x1b\x80-\x9f]")
_OSC_END = re.compile("[\x07\x18\x1a\x1b\x80-\x9f]")
_STRING_INTRODUCERS = "PX^_"  # DCS, SOS, PM, APC (ECMA-48 8.3.27, 8.3.128, 8.3.94, 8.3.2)


class _State(Enum):
    GROUND = "ground"
    STRING = "control string"  # DCS, SOS, PM, APC: skipped up to their end
    OSC = "operating system command"  # the same, but BEL ends it too
    IGNORE_ESC = "ignore escape"  # an over-long sequence, skipped up to its final byte
    IGNORE_CSI = "ignore control sequence"


class _Scanner:
    """The shared parser; subclasses decide what each piece becomes."""

    def __init__(self) -> None:
        self._state = _State.GROUND
        self._pending = ""  # the start of a sequence cut by the end of the previous feed

    def feed(self, text: str) -> str:
        """Return what can be emitted now; an unfinished sequence waits for the next call."""
        out: list[str] = []
        if self._pending:
            text, self._pending = self._pending + text, ""
        pos, end = 0, len(text)
        while pos < end:
            if self._state is _State.GROUND:
                pos = self._ground(text, pos, out)
            elif self._state in (_State.STRING, _State.OSC):
                pos = self._skip_string(text, pos)
            else:
                pos = self._skip_ignored(text, pos, out)
        return "".join(out)

    def flush(self) -> str:
        """End of the recording: an unfinished sequence is dropped, its controls executed."""
        pending, self._pending = self._pending, ""
        self._state = _State.GROUND
        out: list[str] = []
        self._controls(pending, out)
        return "".join(out)

    # -- hooks ---------------------------------------------------------------------------
    def _text(self, run: str, out: list[str]) -> None:
        raise NotImplementedError

    def _csi(self, params: str, inter: str, final: str, out: list[str]) -> None:
        """A whole control sequence ``CSI params inter final`` (no control characters)."""

    def _esc(self, inter: str, final: str, out: list[str]) -> None:
        """A whole escape sequence ``ESC inter final`` (not CSI nor a string introducer)."""

    # -- parser --------------------------------------------------------------------------
    def _ground(self, text: str, pos: int, out: list[str]) -> int:
        if m := _TEXT.match(text, pos):
            self._text(m.group(), out)
            return m.end()
        if m := _CLEAN_CSI.match(text, pos):
            if m.end() - 1 - pos <= MAX_SEQUENCE:
                self._csi(m[1], m[2], m[3], out)
            return m.end()
        char = text[pos]
        if char == ESC:
            return self._escape(text, pos, out)
        if "\x80" <= char <= "\x9f":  # C1 control: the same as ESC Fe (ECMA-48 5.3)
            return self._introduced(text, pos, pos + 1, chr(ord(char) - 0x40), out)
        if "\ud800" <= char <= "\udfff":  # a lone surrogate: not encodable, not a character
            self._text("\ufffd", out)
            return pos + 1
        m = _DROPPED_C0.match(text, pos)
        assert m is not None  # every other character is a C0 control that is not kept
        return m.end()

    def _escape(self, text: str, pos: int, out: list[str]) -> int:
        m = _ESC_BODY.match(text, pos + 1)
        end = m.end() if m else pos + 1
        if end == len(text):
            return self._unfinished(text, pos, _State.IGNORE_ESC, out)
        controls, inter = _split_controls(text[pos + 1 : end])
        final = text[end]
        if end - pos > MAX_SEQUENCE:  # as if cut by a feed: skipped like IGNORE_ESC does
            self._controls(controls, out)
            return end + 1 if "0" <= final <= "~" or final in _CANCEL else end
        if not inter and final in "[]" + _STRING_INTRODUCERS:
            # Controls seen so far are executed only once the whole sequence is known.
            return self._introduced(text, pos, end + 1, final, out, controls)
        self._controls(controls, out)
        if "0" <= final <= "~":
            self._esc(inter, final, out)
            return end + 1
        return end + 1 if final in _CANCEL else end  # ESC, C1 or a non-ASCII char: restart

    def _introduced(
        self, text: str, pos: int, body: int, fe: str, out: list[str], controls: str = ""
    ) -> int:
        """After ``ESC fe`` or its C1 form (at ``pos``; ``body`` is the index after it)."""
        if fe == "[":
            m = _CSI_BODY.match(text, body)
            end = m.end() if m else body
            if end == len(text):
                return self._unfinished(text, pos, _State.IGNORE_CSI, out)
            self._controls(controls, out)
            return self._end_csi(text[body:end], text[end], end, out, end - pos > MAX_SEQUENCE)
        self._controls(controls, out)
        if fe == "]":
            self._state = _State.OSC
        elif fe in _STRING_INTRODUCERS:
            self._state = _State.STRING
        elif fe in "DEHMNO":  # IND NEL HTS RI SS2 SS3 (ECMA-48 8.3.63, 8.3.86, 8.3.62...)
            self._esc("", fe, out)
        return body  # other C1 controls (and ST alone) are dropped

    def _end_csi(self, body: str, final: str, end: int, out: list[str], too_long: bool) -> int:
        controls, rest = _split_controls(body)
        self._controls(controls, out)
        if "@" <= final <= "~":
            # Not matching _CSI_PARTS (a parameter byte after an intermediate) is malformed:
            # dropped whole, as xterm does.
            if not too_long and (m := _CSI_PARTS.fullmatch(rest)):
                self._csi(m[1], m[2], final, out)
            return end + 1
        return end + 1 if final in _CANCEL else end

    def _unfinished(self, text: str, pos: int, ignore: _State, out: list[str]) -> int:
        rest = text[pos:]
        if len(rest) <= MAX_SEQUENCE:
            self._pending = rest
        else:  # too long to be real: drop it, execute its controls, skip to its final byte
            self._controls(rest, out)
            self._state = ignore
        return len(text)

    def _skip_string(self, text: str, pos: int) -> int:
        pattern = _OSC_END if self._state is _State.OSC else _STRING_END
        m = pattern.search(text, pos)
        if m is None:
            return len(text)
        self._state = _State.GROUND
        char = m.group()
        # ESC and C1 controls other than ST end the string and are parsed again.
        return m.end() if char in "\x07\x9c" or char in _CANCEL else m.start()

    def _skip_ignored(self, text: str, pos: int, out: list[str]) -> int:
        csi = self._state is _State.IGNORE_CSI
        m = (_CSI_BODY if csi else _ESC_BODY).match(text, pos)
        end = m.end() if m else pos
        self._controls(text[pos:end], out)
        if end == len(text):
            return end
        self._state = _State.GROUND
        final = text[end]
        done = ("@" if csi else "0") <= final <= "~" or final in _CANCEL
        return end + 1 if done else end

    def _controls(self, text: str, out: list[str]) -> None:
        """Emit the kept C0 controls found in ``text`` (those executed inside a sequence)."""
        kept = "".join(_KEPT_C0.findall(text))
        if kept:
            self._text(kept, out)


def _split_controls(body: str) -> tuple[str, str]:
    """(the kept C0 controls of ``body``, ``body`` without any control)."""
    if not _ANY_C0.search(body):
        return "", body
    return "".join(_KEPT_C0.findall(body)), _ANY_C0.sub("", body)


# -- what the replay keeps ---------------------------------------------------------------
# CSI sequences that only draw, as (private marker, intermediates, final) (ECMA-48 8.3 and
# xterm ctlseqs "Functions using CSI"): ICH CUU CUD CUF CUB CNL CPL CHA CUP CHT ED EL IL DL DCH
# SU SD ECH CBT HPA HPR REP VPA VPR HVP TBC SGR DECSTBM SCOSC/DECSLRM SCORC; DECSED DECSEL;
# DECSCUSR DECSTR SL SR DECIC DECDC DECSCA DECSACE; DECCARA DECRARA DECCRA DECFRA DECERA DECSERA.
# Not here, so dropped: DA (c), DSR (n), window ops and reports (t), DECREQTPARM (x), DECLL (q),
# MC (i, printer), DECTST (y), DECRQCRA (* y), DECRQM ($ p), DECSCL (" p), XTVERSION (> q),
# XTMODKEYS (> m), kitty keyboard (> u, ? u), XTSAVE/XTRESTORE (? s, ? r), XTSMGRAPHICS (? S)...
_CSI_KEEP = frozenset(
    {("", "", final) for final in "@ABCDEFGHIJKLMPSTXZ`abdefgmrsu"}
    | {("?", "", "J"), ("?", "", "K")}
    | {("", " ", "q"), ("", "!", "p"), ("", " ", "@"), ("", " ", "A"), ("", "'", "}")}
    | {("", "'", "~"), ("", '"', "q"), ("", "*", "x")}
    | {("", "$", final) for final in "rtvxz{"}
)
_MODE_SEQUENCES = frozenset({("", "", "h"), ("", "", "l"), ("?", "", "h"), ("?", "", "l")})
_ANSI_MODES = frozenset({"4", "20"})  # IRM, LNM; not KAM (2, locks the keyboard), SRM (12)
# DEC private modes (xterm ctlseqs, "DECSET"): DECCKM, DECSCLM, DECSCNM, DECOM, DECAWM, cursor
# blink, DECTCEM, reverse wraparound, alternate screens, DECLRMM, save cursor, bracketed paste,
# synchronized output.
_DEC_MODES = frozenset(
    {"1", "4", "5", "6", "7", "12", "25", "45", "47", "69", "1047", "1048", "1049", "2004", "2026"}
)
_ALT_SCREENS = ("?1049", "?1047", "?47")  # left first when restoring: they restore the cursor
_ON_BY_DEFAULT = frozenset({"?7", "?25"})
# ESC Fp/Fe/Fs (ECMA-35 and xterm): DECBI DECSC DECRC DECFI DECKPAM DECKPNM IND NEL HTS RI SS2 SS3
# RIS LS2 LS3 LS3R LS2R LS1R. Not DECID (ESC Z: answers like DA), ST alone, nor ``ESC l/m``.
_ESC_KEEP = frozenset("6789=>DEHMNOcno|}~")
_DESIGNATE = "()*+-./"  # SCS: ESC I [I] F designates G0-G3 (ECMA-35 14.3); ``ESC %`` is not kept


class _Changes:
    """What the replayed output changed in the terminal, to be undone at the end."""

    def __init__(self) -> None:
        self.modes: dict[str, bool] = {}
        self.margins = self.sgr = self.keypad = self.shifted = False
        self.charset = self.cursor_style = False


class Sanitizer(_Scanner):
    """Streaming filter for replay: ``feed`` each output event's text, then ``flush``.

    Output keeps the screen as the user saw it and holds nothing that can query, answer back,
    reconfigure the auditor's terminal (see the module docstring for the exact rules). After
    the replay, write :meth:`restore` to undo the modes the recording left changed."""

    def __init__(self) -> None:
        super().__init__()
        self._changes = _Changes()

    def restore(self) -> str:
        """Sequences putting back every mode, margin, attribute and character set the output
        changed and left so: alternate screen, cursor visibility, insert mode, keypad...
        (only those, so nothing needless such as a cursor restore is sent)."""
        done = self._changes
        order = sorted(done.modes.items(), key=lambda kv: (kv[0] not in _ALT_SCREENS, kv[0]))
        parts = [
            f"\x1b[{name}{'h' if name in _ON_BY_DEFAULT else 'l'}"
            for name, on in order
            if on != (name in _ON_BY_DEFAULT)
        ]
        if done.margins:  # DECSTBM homes the cursor: keep it where it is (DECSC/DECRC)
            parts.append("\x1b7\x1b[r\x1b8")
        flags = (
            (done.sgr, "\x1b[m"),
            (done.keypad, "\x1b>"),
            (done.shifted, "\x0f"),
            (done.charset, "\x1b(B"),
            (done.cursor_style, "\x1b[ q"),
        )
        parts.extend(seq for flag, seq in flags if flag)
        return "".join(parts)

    def _text(self, run: str, out: list[str]) -> None:
        out.append(run)
        if "\x0e" in run or "\x0f" in run:  # SO / SI: which of G1 / G0 is in use
            self._changes.shifted = run.rfind("\x0e") > run.rfind("\x0f")

    def _csi(self, params: str, inter: str, final: str, out: list[str]) -> None:
        m = _CSI_PARAMS.fullmatch(params)
        if m is None or _HUGE_NUMBER.search(params):
            return
        prefix, args = m.groups()
        key = (prefix, inter, final)
        if key in _MODE_SEQUENCES:
            args = self._modes(prefix, args, final == "h")
            if not args:
                return
        elif key not in _CSI_KEEP or (final == "T" and ";" in args):
            return  # CSI T with several parameters is xterm's mouse highlight tracking
        else:
            self._track(key, args)
        out.append(f"\x1b[{prefix}{args}{inter}{final}")

    def _modes(self, prefix: str, args: str, on: bool) -> str:
        """The allowed modes of a SM/RM or DECSET/DECRST list (the others are left out)."""
        allowed = _DEC_MODES if prefix else _ANSI_MODES
        kept = [mode for mode in args.split(";") if mode in allowed]
        for mode in kept:
            if mode != "1048":  # save/restore cursor: an action, not a state
                self._changes.modes[prefix + mode] = on
        return ";".join(kept)

    def _track(self, key: tuple[str, str, str], args: str) -> None:
        changes = self._changes
        if key == ("", "", "m"):
            changes.sgr = args not in ("", "0")
        elif key == ("", "", "r"):
            changes.margins = bool(args.strip(";"))
        elif key == ("", " ", "q"):
            changes.cursor_style = args not in ("", "0")
        # DECSTR (CSI ! p) resets some of these but not the screen in use: tracking goes on,
        # and restoring what DECSTR already reset is harmless.

    def _esc(self, inter: str, final: str, out: list[str]) -> None:
        changes = self._changes
        if not inter:
            if final not in _ESC_KEEP:
                return
            if final == "c":  # RIS: the terminal is back to its initial state
                self._changes = _Changes()
            elif final in "=>":
                changes.keypad = final == "="
            elif final in "no":  # LS2, LS3: G2 or G3 in use, until SI
                changes.shifted = True
        elif inter[0] in _DESIGNATE and len(inter) <= 2:
            if inter == "(":
                changes.charset = final != "B"
        elif inter != "#" or final not in "34568":  # DECDHL DECSWL DECDWL DECALN
            return
        out.append(ESC + inter + final)


def sanitize(text: str) -> str:
    """A whole text through a new :class:`Sanitizer` (without :meth:`Sanitizer.restore`)."""
    sanitizer = Sanitizer()
    return sanitizer.feed(text) + sanitizer.flush()


# -- readable transcripts ----------------------------------------------------------------
_TRANSCRIPT = str.maketrans({"\x07": None, "\x0e": None, "\x0f": None, "\x0b": "\n", "\x0c": "\n"})
_MOVES = re.compile("([\r\b])")


class Stripper(_Scanner):
    """Streaming text extractor: every sequence removed, only ``\\n``, ``\\t`` and text left.

    It keeps one line the way a terminal would show it: CR goes back to its start (so CR LF
    becomes LF, and a progress line shows its last state), BS and CUB move left, CUF right,
    text overwrites, EL erases, DCH/ICH delete and insert; trailing blanks of a line are
    dropped (a screen does not show them). :meth:`feed` returns whole lines;
    :meth:`flush` returns the last, unfinished one. A line longer than MAX_LINE characters is
    written out as it is and a new one started, so memory stays bounded."""

    def __init__(self) -> None:
        super().__init__()
        self._cells: list[str] = []
        self._col = 0

    def flush(self) -> str:
        rest = super().flush()  # controls of an unfinished sequence, through _text
        line, self._cells, self._col = "".join(self._cells), [], 0
        return rest + line

    def _text(self, run: str, out: list[str]) -> None:
        lines = run.translate(_TRANSCRIPT).split("\n")
        for line in lines[:-1]:
            self._put(line)
            out.append("".join(self._cells).rstrip(" ") + "\n")  # blanks nobody sees
            self._cells, self._col = [], 0
        self._put(lines[-1])
        if len(self._cells) > MAX_LINE:
            out.append("".join(self._cells))
            self._cells, self._col = [], 0

    def _put(self, text: str) -> None:
        cells = self._cells
        if self._col == len(cells) and "\r" not in text and "\b" not in text:
            cells.extend(text)  # the common case: text appended at the end of the line
            self._col = len(cells)
            return
        for piece in _MOVES.split(text):
            if piece == "\r":
                self._col = 0
            elif piece == "\b":
                self._col = max(0, self._col - 1)
            elif piece:
                self._write(piece)

    def _write(self, piece: str) -> None:
        col, cells = self._col, self._cells
        if col > len(cells):
            cells.extend(" " * (col - len(cells)))
        cells[col : col + len(piece)] = piece
        self._col = col + len(piece)

    def _csi(self, params: str, inter: str, final: str, out: list[str]) -> None:
        if inter or final not in "@CDKP" or not (params.isdigit() or not params):
            return
        n = min(int(params or "0"), MAX_LINE)  # a huge count must not mean a huge line
        col, cells = self._col, self._cells
        if final == "C":
            self._col = col + max(n, 1)
        elif final == "D":
            self._col = max(0, col - max(n, 1))
        elif final == "P":
            del cells[col : col + max(n, 1)]
        elif final == "@" and col < len(cells):
            cells[col:col] = " " * max(n, 1)
        elif final == "K" and n == 0:  # EL: to the end of the line (ECMA-48 8.3.41)
            del cells[col:]
        elif final == "K" and n == 1:  # from its start
            cells[: col + 1] = " " * min(col + 1, len(cells))
        elif final == "K" and n == 2:  # all of it
            cells.clear()


def strip_to_text(text: str) -> str:
    """A whole text through a new :class:`Stripper`."""
    stripper = Stripper()
    return stripper.feed(text) + stripper.flush()
