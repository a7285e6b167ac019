"""The local protocol between the recorder / PAM hook and the agent daemon, sans-IO.

Transport: a Unix stream socket (path in the agent config). Every message is framed as

    u8 type || u32 length (big-endian) || payload (length bytes, at most MAX_PAYLOAD)

Control messages carry a UTF-8 JSON object; data-path messages carry a small binary
prefix and raw bytes (no JSON escaping on the hot path).

Conversation of a recorder (runs as the logged-in user):
    -> HELLO {json}                   what sshd told the ForceCommand (see Hello)
    <- ACCEPT {json} | REFUSE {json}  session id and recording policy, or why not
    -> DATA / RESIZE / MARKER ...     the session as it happens (times are seconds since
                                      the recorder started, on its monotonic clock)
    -> END {json}                     exit status, byte counts, stream hashes
    <- DONE {json}                    the daemon sealed the last frame (fsynced)

Conversation of the PAM hook (runs as root inside sshd's PAM stack):
    -> PAM {json}                     open_session / close_session for a user
    <- DONE {json}

Invariants: the decoder never buffers more than one message (HEADER + MAX_PAYLOAD);
malformed input raises :class:`ProtocolError`, never another exception. Standard library
only: the recorder and the PAM hook import this module on every login.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from sshaudit.errors import FormatError

MAX_PAYLOAD = (1 << 20) + 64
_HEAD = struct.Struct(">BI")
_DATA = struct.Struct(">dB")  # time (f64 seconds), stream code
_RESIZE = struct.Struct(">dHH")  # time, cols, rows
_TIME = struct.Struct(">d")
HEADER_LEN = _HEAD.size
PROTOCOL_VERSION = 1


class ProtocolError(FormatError):
    """A peer sent something that is not this protocol."""


class MsgType(IntEnum):
    HELLO = 1
    ACCEPT = 2
    REFUSE = 3
    DATA = 4
    RESIZE = 5
    MARKER = 6
    END = 7
    DONE = 8
    PAM = 9


class Stream(IntEnum):
    """Which byte stream a DATA message carries (the asciicast code it becomes)."""

    OUTPUT = ord("o")  # pty output, or the exec command's stdout
    INPUT = ord("i")  # what the user typed, or the exec command's stdin
    ERROR = ord("e")  # the exec command's stderr (shown as output in the asciicast)


JSON_TYPES = frozenset(
    {MsgType.HELLO, MsgType.ACCEPT, MsgType.REFUSE, MsgType.END, MsgType.DONE, MsgType.PAM}
)


@dataclass(frozen=True)
class Message:
    type: MsgType
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload of a control message as a JSON object."""
        try:
            doc = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"{self.type.name}: payload is not UTF-8 JSON") from exc
        if not isinstance(doc, dict):
            raise ProtocolError(f"{self.type.name}: payload is not a JSON object")
        return doc


@dataclass(frozen=True)
class Data:
    time: float
    stream: Stream
    data: bytes


@dataclass(frozen=True)
class Resize:
    time: float
    cols: int
    rows: int


@dataclass(frozen=True)
class Marker:
    time: float
    label: str


def encode(msg_type: MsgType, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too large")
    return _HEAD.pack(msg_type, len(payload)) + payload


def encode_json(msg_type: MsgType, doc: dict[str, Any]) -> bytes:
    return encode(msg_type, json.dumps(doc, separators=(",", ":")).encode())


def encode_data(t: float, stream: Stream, data: bytes) -> bytes:
    """One DATA message; ``data`` must leave room for the 9-byte prefix in MAX_PAYLOAD."""
    return _HEAD.pack(MsgType.DATA, _DATA.size + len(data)) + _DATA.pack(t, stream) + data


def encode_resize(t: float, cols: int, rows: int) -> bytes:
    return encode(MsgType.RESIZE, _RESIZE.pack(t, min(cols, 0xFFFF), min(rows, 0xFFFF)))


def encode_marker(t: float, label: str) -> bytes:
    return encode(MsgType.MARKER, _TIME.pack(t) + label.encode("utf-8", "replace")[:4096])


def _time(value: float) -> float:
    if not (value >= 0.0 and value < 1e9):  # also rejects NaN
        raise ProtocolError("time out of range")
    return value


def parse_data(payload: bytes) -> Data:
    if len(payload) < _DATA.size:
        raise ProtocolError("DATA: too short")
    t, code = _DATA.unpack_from(payload)
    try:
        stream = Stream(code)
    except ValueError:
        raise ProtocolError(f"DATA: unknown stream {code}") from None
    return Data(_time(t), stream, payload[_DATA.size :])


def parse_resize(payload: bytes) -> Resize:
    if len(payload) != _RESIZE.size:
        raise ProtocolError("RESIZE: wrong length")
    t, cols, rows = _RESIZE.unpack(payload)
    if cols < 1 or rows < 1:
        raise ProtocolError("RESIZE: zero size")
    return Resize(_time(t), cols, rows)


def parse_marker(payload: bytes) -> Marker:
    if len(payload) < _TIME.size:
        raise ProtocolError("MARKER: too short")
    (t,) = _TIME.unpack_from(payload)
    return Marker(_time(t), payload[_TIME.size :].decode("utf-8", "replace"))


class Decoder:
    """Splits a byte stream into :class:`Message` values; feed it whatever recv gave."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        pos = 0
        while len(self._buf) - pos >= HEADER_LEN:
            code, length = _HEAD.unpack_from(self._buf, pos)
            try:
                msg_type = MsgType(code)
            except ValueError:
                raise ProtocolError(f"unknown message type {code}") from None
            if length > self._max:
                raise ProtocolError(f"{msg_type.name}: payload of {length} bytes is too large")
            end = pos + HEADER_LEN + length
            if len(self._buf) < end:
                break
            out.append(Message(msg_type, bytes(self._buf[pos + HEADER_LEN : end])))
            pos = end
        del self._buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held (non-zero at EOF means a cut message)."""
        return len(self._buf)
