"""asciicast v2, sans-IO (https://docs.asciinema.org/manual/asciicast/v2/).

:class:`Encoder` takes timed terminal events (bytes as read from a pty or pipe) and returns
the file's lines as UTF-8 bytes; :class:`Decoder` takes a file's bytes in any pieces and
returns :class:`Header` and :class:`Event` values, or raises
:class:`~sshaudit.errors.AsciicastError` with the line number and the reason.

Invariants:
- every line written is one JSON value followed by ``\\n``; the first is the header;
- event times are seconds since the start, with microsecond precision, never decreasing;
- a UTF-8 sequence split across two reads is kept whole (one incremental decoder per
  stream), so no character is ever cut in two;
- bytes that are not UTF-8 cannot go into JSON text as they are. They are shown as U+FFFD
  in the event (what a UTF-8 terminal shows), and never vanish silently: right after that
  event a marker event ``[t, "m", "sshaudit: invalid UTF-8 in o: N bytes: ff fe ..."]``
  names how many bytes were replaced and their values (the first 64 of them).

Standard library only: the recorder may import this module.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sshaudit.errors import AsciicastError

MAX_LINE = 8 * 1024 * 1024  # longest line the decoder buffers (a 1 MiB read escapes to ~6 MiB)
_HEX_SHOWN = 64
_ESCAPED = re.compile("[\udc80-\udcff]+")


class Code(Enum):
    """Event codes of asciicast v2."""

    OUTPUT = "o"
    INPUT = "i"
    RESIZE = "r"
    MARKER = "m"


_CODES = {code: json.dumps(code.value) for code in Code}


@dataclass(frozen=True)
class Header:
    """The header line. ``extra`` holds every other field (``sshaudit`` among them)."""

    width: int
    height: int
    timestamp: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    command: str | None = None
    title: str | None = None
    idle_time_limit: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"version": 2, "width": self.width, "height": self.height}
        optional = {
            "timestamp": self.timestamp,
            "idle_time_limit": self.idle_time_limit,
            "command": self.command,
            "title": self.title,
        }
        doc.update({k: v for k, v in optional.items() if v is not None})
        if self.env:
            doc["env"] = dict(self.env)
        for key, value in self.extra.items():
            doc.setdefault(key, value)
        return doc


@dataclass(frozen=True)
class Event:
    time: float
    code: Code
    data: str


def format_time(t: float) -> str:
    """Seconds with microsecond precision, no exponent, no needless zeros ("1.5", "0.000001")."""
    text = f"{t:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


class Encoder:
    """Turns events into asciicast v2 lines. All methods return complete lines (bytes),
    possibly none. Times are seconds since the recording started (the caller's clock)."""

    def __init__(self, header: Header) -> None:
        if header.width < 1 or header.height < 1:
            raise ValueError("terminal width and height must be positive")
        self.header = header
        self._last = 0.0
        self._decoders = {
            code: codecs.getincrementaldecoder("utf-8")("surrogateescape")
            for code in (Code.OUTPUT, Code.INPUT)
        }
        self.invalid_bytes = {Code.OUTPUT: 0, Code.INPUT: 0}

    def header_line(self) -> bytes:
        text = json.dumps(self.header.to_json(), ensure_ascii=False, separators=(", ", ": "))
        return text.encode() + b"\n"

    def _time(self, t: float) -> str:
        if not math.isfinite(t):
            raise ValueError("event time must be finite")
        # Clocks can step back (NTP); the file's times never do.
        self._last = max(self._last, t)
        return format_time(self._last)

    def _line(self, t: float, code: Code, data: str) -> bytes:
        # For ASCII data both settings give the same bytes, and ensure_ascii=True is the
        # much faster C path; other text is kept as readable UTF-8, as asciinema writes it.
        text = json.dumps(data, ensure_ascii=data.isascii())
        return f"[{self._time(t)}, {_CODES[code]}, {text}]\n".encode()

    def _decode(self, code: Code, data: bytes, final: bool) -> tuple[str, bytes]:
        """Decode what is complete; return the text and the invalid bytes it replaced.

        ``surrogateescape`` maps each invalid byte to one lone surrogate (U+DC80..U+DCFF)
        at C speed; those are then swapped for U+FFFD, one per byte, and collected."""
        text = self._decoders[code].decode(data, final)
        # str.isascii() is O(1) in CPython: the common case skips the regex scan entirely.
        if text.isascii() or not _ESCAPED.search(text):
            return text, b""
        bad = bytes(ord(ch) - 0xDC00 for run in _ESCAPED.findall(text) for ch in run)
        self.invalid_bytes[code] += len(bad)
        return _ESCAPED.sub(lambda m: "\ufffd" * len(m.group()), text), bad

    def _stream(self, t: float, code: Code, data: bytes, final: bool = False) -> bytes:
        text, bad = self._decode(code, data, final)
        out = self._line(t, code, text) if text else b""
        if bad:
            shown = bad[:_HEX_SHOWN].hex(" ")
            more = " ..." if len(bad) > _HEX_SHOWN else ""
            label = f"sshaudit: invalid UTF-8 in {code.value}: {len(bad)} bytes: {shown}{more}"
            out += self._line(t, Code.MARKER, label)
        return out

    def output(self, t: float, data: bytes) -> bytes:
        return self._stream(t, Code.OUTPUT, data)

    def input(self, t: float, data: bytes) -> bytes:
        return self._stream(t, Code.INPUT, data)

    def resize(self, t: float, cols: int, rows: int) -> bytes:
        return self._line(t, Code.RESIZE, f"{cols}x{rows}")

    def marker(self, t: float, label: str) -> bytes:
        return self._line(t, Code.MARKER, label)

    def flush(self, t: float) -> bytes:
        """At the end of the recording: a sequence left incomplete is replaced and named."""
        return self._stream(t, Code.OUTPUT, b"", final=True) + self._stream(
            t, Code.INPUT, b"", final=True
        )


def _positive_int(doc: Mapping[str, Any], name: str, line: int) -> int:
    value = doc.get(name)
    if type(value) is not int or value < 1:
        raise AsciicastError(line, f"header: {name!r} must be a positive integer")
    return value


def parse_header(doc: object, line: int = 1) -> Header:
    if not isinstance(doc, dict):
        raise AsciicastError(line, "the header must be a JSON object")
    if doc.get("version") != 2 or type(doc.get("version")) is not int:
        raise AsciicastError(line, f"unsupported version {doc.get('version')!r} (expected 2)")
    width, height = _positive_int(doc, "width", line), _positive_int(doc, "height", line)
    timestamp = doc.get("timestamp")
    if timestamp is not None and type(timestamp) is not int:
        raise AsciicastError(line, "header: 'timestamp' must be an integer")
    env = doc.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise AsciicastError(line, "header: 'env' must map names to strings")
    for name in ("command", "title"):
        if doc.get(name) is not None and not isinstance(doc[name], str):
            raise AsciicastError(line, f"header: {name!r} must be a string")
    idle = doc.get("idle_time_limit")
    if idle is not None and _finite(idle) is None:
        raise AsciicastError(line, "header: 'idle_time_limit' must be a finite number")
    known = {"version", "width", "height", "timestamp", "env", "command", "title"}
    known.add("idle_time_limit")
    return Header(
        width=width,
        height=height,
        timestamp=timestamp,
        env=env,
        command=doc.get("command"),
        title=doc.get("title"),
        idle_time_limit=_finite(idle),
        extra={k: v for k, v in doc.items() if k not in known},
    )


def _finite(value: object) -> float | None:
    """``value`` as a float if it is a finite JSON number, else None. An integer too big
    for a float (JSON allows any number of digits) is not finite here: converting it
    would raise OverflowError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def parse_event(doc: object, line: int, previous: float) -> Event:
    if not isinstance(doc, list) or len(doc) != 3:
        raise AsciicastError(line, "an event must be a JSON array [time, code, data]")
    raw_t, code, data = doc
    t = _finite(raw_t)
    if t is None or t < 0:
        raise AsciicastError(line, "event time must be a non-negative number")
    if t < previous:
        raise AsciicastError(line, f"event time {t} goes back (previous event at {previous})")
    try:
        kind = Code(code)
    except ValueError:
        raise AsciicastError(line, f"unknown event code {code!r}") from None
    if not isinstance(data, str):
        raise AsciicastError(line, "event data must be a string")
    if kind is Code.RESIZE and not _is_size(data):
        raise AsciicastError(line, f"resize data must be COLSxROWS, not {data[:40]!r}")
    return Event(t, kind, data)


def _is_size(data: str) -> bool:
    cols, sep, rows = data.partition("x")
    return bool(sep) and cols.isdigit() and rows.isdigit() and cols.isascii() and rows.isascii()


class Decoder:
    """Reads an asciicast v2 file fed in pieces. :meth:`feed` returns the header (once,
    first) and the events completed by the new bytes; :meth:`close` ends the input."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._line = 0
        self._last = 0.0
        self._failed: AsciicastError | None = None
        self.header: Header | None = None

    def feed(self, data: bytes) -> list[Header | Event]:
        self._check_failed()
        self._buf += data
        out: list[Header | Event] = []
        start = 0
        try:
            while (end := self._buf.find(b"\n", start)) >= 0:
                out.extend(self._parse(bytes(self._buf[start:end])))
                start = end + 1
            if len(self._buf) - start > MAX_LINE:
                raise AsciicastError(self._line + 1, f"line longer than {MAX_LINE} bytes")
        except AsciicastError as exc:
            self._failed = exc
            raise
        finally:
            del self._buf[:start]
        return out

    def _check_failed(self) -> None:
        # A decoder that failed stays failed: feeding it again must not re-parse the bad
        # line under the next line number, nor go on past it.
        if self._failed is not None:
            raise AsciicastError(self._failed.line, self._failed.reason)

    def close(self) -> list[Header | Event]:
        """The last line may lack its newline; a file with no header is an error."""
        self._check_failed()
        rest, self._buf = bytes(self._buf), bytearray()
        try:
            out = self._parse(rest) if rest.strip() else []
            if self.header is None:
                raise AsciicastError(0, "empty file: no header line")
        except AsciicastError as exc:
            self._failed = exc
            raise
        return out

    def _parse(self, raw: bytes) -> list[Header | Event]:
        self._line += 1
        if not raw.strip():
            return []  # blank lines carry nothing; asciinema skips them too
        try:
            doc = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise AsciicastError(self._line, "not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            raise AsciicastError(
                self._line, f"not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        except ValueError:
            raise AsciicastError(self._line, "not valid JSON") from None
        except RecursionError:  # json raises it, not ValueError, for deeply nested input
            raise AsciicastError(self._line, "not valid JSON (nested too deeply)") from None
        if self.header is None:
            self.header = parse_header(doc, self._line)
            return [self.header]
        event = parse_event(doc, self._line, self._last)
        self._last = event.time
        return [event]


def decode_all(data: bytes) -> tuple[Header, list[Event]]:
    """Convenience: a whole file's bytes to its header and events."""
    decoder = Decoder()
    items = decoder.feed(data) + decoder.close()
    assert decoder.header is not None
    return decoder.header, [item for item in items if isinstance(item, Event)]
