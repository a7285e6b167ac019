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
only: the recorder imports this module on every login.

Why no dataclasses, enum, typing or json here: the recorder is sshd's ForceCommand, so it
starts on every login, and what it imports is what a login pays for (DESIGN.md "Performance
facts": a bare ``python3 -I -S`` ForceCommand adds ~1 % to ``ssh host true``; the imports
are the cost). Measured on this host (``python -I -S -X importtime``, and wall time over a
bare interpreter): dataclasses ~20 ms (it imports inspect, which imports ast, dis,
tokenize...), typing ~13 ms, json ~10 ms (its pure-Python parts import re, which imports
enum), enum ~5 ms. So this module (and the recorder's others) use instead:

- :class:`Frozen`: values with ``__slots__`` and a typed ``__init__``; equality, hash and
  repr as a frozen dataclass has them, and assignment raises;
- :class:`IntCode` / :class:`StrCode`: named constants, one object per value (``is``
  works), ``Cls(v)`` looks a value up or raises ValueError, ``.name``, ``.value``: what
  IntEnum / Enum gave, without enum;
- :func:`json_dumps` / :func:`json_loads`: the json package's own C accelerator (``_json``:
  the scanner ``json.loads`` uses and the string escaping of ``json.dumps``) without its
  pure-Python wrapper. Anything the small encoder does not take (floats, non-str keys,
  other types, deep nesting), and a Python without ``_json``, goes through the json
  package (imported then), so the output is always what ``json.dumps`` gives; this is
  fuzzed against json in tests/test_recorder_startup.py;
- typing names only for the type checker (``TYPE_CHECKING``, postponed annotations).
"""

from __future__ import annotations

import struct

from sshaudit.errors import FormatError

# typing costs start time at every login: it is imported for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, Self

try:
    import _json
except ImportError:  # pragma: no cover - CPython always builds it; json then works alone
    _json = None  # type: ignore[assignment]

MAX_PAYLOAD = (1 << 20) + 64
_HEAD = struct.Struct(">BI")
_DATA = struct.Struct(">dB")  # time (f64 seconds), stream code
_RESIZE = struct.Struct(">dHH")  # time, cols, rows
_TIME = struct.Struct(">d")
HEADER_LEN = _HEAD.size
PROTOCOL_VERSION = 1


class ProtocolError(FormatError):
    """A peer sent something that is not this protocol."""


# -- values and codes without dataclasses/enum (see the module docstring) ----------------


class Frozen:
    """Base of immutable values: subclasses name their fields in ``__slots__``, in
    ``__init__`` order (not sorted: hence ``noqa: RUF023``), annotate them, and pass the
    values to ``super().__init__`` in that order."""

    __slots__: tuple[str, ...] = ()

    def __init__(self, *values: object) -> None:
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._fields() == other._fields()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{self.__class__.__qualname__}({fields})"

    def __reduce__(self) -> tuple[type[Self], tuple[object, ...]]:
        return (self.__class__, self._fields())  # copy and pickle go through __init__

    if not TYPE_CHECKING:  # at run time only: mypy keeps checking attribute names

        def __setattr__(self, name, value):
            raise AttributeError(f"cannot assign to field {name!r}")

        def __delattr__(self, name):
            raise AttributeError(f"cannot delete field {name!r}")


class _Member:
    """A member's value inside an :class:`IntCode`/:class:`StrCode` body (see there)."""

    __slots__ = ("value",)

    def __init__(self, value: int | str) -> None:
        self.value = value


def member(value: int | str) -> Any:
    """Declare a code: ``NAME: ClassVar[Sub] = member(3)`` (typed Any for that line only)."""
    return _Member(value)


class _Named:
    """What IntEnum/Enum gave this package, without enum: after the class body, every
    ``member(v)`` attribute is an instance of the class, the only one with that value
    (``is`` works); ``Cls(v)`` returns it or raises ValueError; ``.name`` and ``.value``."""

    __slots__ = ()
    _names: ClassVar[dict[object, str]] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        base: type[int | str] = int if issubclass(cls, int) else str
        names: dict[object, str] = {}
        for name, value in list(vars(cls).items()):
            if isinstance(value, _Member):
                if type(value.value) is not base or value.value in names:
                    raise TypeError(f"{cls.__name__}.{name}: not a new {base.__name__}")
                names[value.value] = name
                setattr(cls, name, base.__new__(cls, value.value))  # type: ignore[type-var]
        cls._names = names

    def __new__(cls, value: object) -> Self:
        try:
            name = cls._names.get(value)
        except TypeError:  # unhashable
            name = None
        if name is None:
            raise ValueError(f"{value!r} is not a valid {cls.__qualname__}")
        found: Self = getattr(cls, name)
        return found

    @property
    def name(self) -> str:
        return self._names[self]

    def __repr__(self) -> str:
        return f"<{self.__class__.__qualname__}.{self.name}: {self.value!r}>"

    if TYPE_CHECKING:

        @property
        def value(self) -> object: ...


class IntCode(_Named, int):
    """Named int constants (IntEnum); ``str()`` is the number, as IntEnum's since 3.11."""

    __slots__ = ()
    __str__ = int.__repr__

    @property
    def value(self) -> int:
        return int(self)


class StrCode(_Named, str):
    """Named str constants (an Enum of strings); ``.value`` is the plain str."""

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)


class MsgType(IntCode):
    HELLO: ClassVar[MsgType] = member(1)
    ACCEPT: ClassVar[MsgType] = member(2)
    REFUSE: ClassVar[MsgType] = member(3)
    DATA: ClassVar[MsgType] = member(4)
    RESIZE: ClassVar[MsgType] = member(5)
    MARKER: ClassVar[MsgType] = member(6)
    END: ClassVar[MsgType] = member(7)
    DONE: ClassVar[MsgType] = member(8)
    PAM: ClassVar[MsgType] = member(9)
    # one authentication observation from the principals command (DESIGN.md "Identity")
    AUTH: ClassVar[MsgType] = member(10)


class Stream(IntCode):
    """Which byte stream a DATA message carries (the asciicast code it becomes)."""

    OUTPUT: ClassVar[Stream] = member(ord("o"))  # pty output, or the exec command's stdout
    INPUT: ClassVar[Stream] = member(ord("i"))  # what the user typed, or the exec's stdin
    ERROR: ClassVar[Stream] = member(ord("e"))  # the exec's stderr (output in the asciicast)


JSON_TYPES = frozenset(
    {
        MsgType.HELLO,
        MsgType.ACCEPT,
        MsgType.REFUSE,
        MsgType.END,
        MsgType.DONE,
        MsgType.PAM,
        MsgType.AUTH,
    }
)


# -- JSON through json's C accelerator (see the module docstring) -------------------------

_JSON_WS = " \t\n\r"  # RFC 8259 section 2 (json.decoder.WHITESPACE)
_JSON_DEPTH = 32  # deeper documents take json.dumps (same output, its recursion checks)


class _JsonDefaults:
    """What ``_json.make_scanner`` reads: json.decoder.JSONDecoder's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {
        "-Infinity": float("-inf"),
        "Infinity": float("inf"),
        "NaN": float("nan"),
    }.__getitem__


_scan: Callable[[str, int], tuple[Any, int]] | None = None
if _json is not None:
    _scan = _json.make_scanner(_JsonDefaults)  # type: ignore[arg-type]


class _NotLeanError(Exception):
    """A value the small encoder leaves to json.dumps."""


def _json_text(value: object, depth: int) -> str:
    # The order and the tests are json's C encoder's (Modules/_json.c encoder_listencode_obj)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if isinstance(value, int):
        return int.__repr__(value)  # as json: an IntCode is written as its number
    if depth >= _JSON_DEPTH:
        raise _NotLeanError
    if type(value) is list or type(value) is tuple:
        return "[" + ",".join([_json_text(v, depth + 1) for v in value]) + "]"
    if type(value) is dict and all(isinstance(k, str) for k in value):
        items = [
            _json.encode_basestring_ascii(k) + ":" + _json_text(v, depth + 1)
            for k, v in value.items()
        ]
        return "{" + ",".join(items) + "}"
    raise _NotLeanError


def json_dumps(value: object) -> str:
    """``json.dumps(value, separators=(",", ":"))``, without importing json for the types
    the recorder sends (str, int, bool, None, lists and str-keyed dicts of them)."""
    if _json is not None:
        try:
            return _json_text(value, 0)
        except _NotLeanError:
            pass
    import json

    return json.dumps(value, separators=(",", ":"))


def json_loads(text: str) -> Any:
    """``json.loads(text)`` for a str: the same scanner, the same errors (ValueError)."""
    if _scan is None:  # pragma: no cover - see the _json import
        import json

        return json.loads(text)
    if text.startswith("\ufeff"):  # json.loads refuses a BOM in a str
        raise ValueError("Unexpected UTF-8 BOM")
    start = len(text) - len(text.lstrip(_JSON_WS))
    try:
        value, end = _scan(text, start)
    except StopIteration:
        raise ValueError("Expecting value") from None
    if text[end:].lstrip(_JSON_WS):
        raise ValueError("Extra data")
    return value


# -- messages -----------------------------------------------------------------------------


class Message(Frozen):
    __slots__ = ("type", "payload")  # noqa: RUF023 (field order: __init__'s)
    type: MsgType
    payload: bytes

    def __init__(self, type: MsgType, payload: bytes) -> None:
        super().__init__(type, payload)

    def json(self) -> dict[str, Any]:
        """The payload of a control message as a JSON object."""
        try:
            doc = json_loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"{self.type.name}: payload is not UTF-8 JSON") from exc
        if not isinstance(doc, dict):
            raise ProtocolError(f"{self.type.name}: payload is not a JSON object")
        return doc


class Data(Frozen):
    __slots__ = ("time", "stream", "data")  # noqa: RUF023
    time: float
    stream: Stream
    data: bytes

    def __init__(self, time: float, stream: Stream, data: bytes) -> None:
        super().__init__(time, stream, data)


class Resize(Frozen):
    __slots__ = ("time", "cols", "rows")  # noqa: RUF023
    time: float
    cols: int
    rows: int

    def __init__(self, time: float, cols: int, rows: int) -> None:
        super().__init__(time, cols, rows)


class Marker(Frozen):
    __slots__ = ("time", "label")  # noqa: RUF023
    time: float
    label: str

    def __init__(self, time: float, label: str) -> None:
        super().__init__(time, label)


def encode(msg_type: MsgType, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too large")
    return _HEAD.pack(msg_type, len(payload)) + payload


def encode_json(msg_type: MsgType, doc: dict[str, Any]) -> bytes:
    return encode(msg_type, json_dumps(doc).encode())


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
