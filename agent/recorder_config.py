"""The few agent-config keys the recorder needs, read with the standard library only.

The recorder runs as the logged-in user on every session, so it must start fast and
must not import the daemon's pydantic model (agent/config.py validates the whole file).
This reader takes the same TOML file and looks only at ``socket`` and
``[policy] on_daemon_down`` / ``break_glass_users`` / ``handshake_timeout``.

Invariants: a missing key takes the documented default (docs/agent-config.md); a key that
is present with a wrong type or value is an error (:class:`ConfigError`), never a silent
default, so a typo cannot turn ``deny`` into ``allow``.

Why a small TOML reader beside tomllib: importing tomllib costs ~20 ms at every login (it
imports re, datetime and string; measured with ``python -I -S``), more than the rest of the
recorder. :func:`lean_toml` reads a strict subset of TOML 1.0 -- bare keys, one-level
``[table]`` headers, basic strings without escapes, literal strings, true/false, decimal
integers and floats, arrays of those, comments, blank lines -- which covers
docs/agent.example.toml. It gives up (returns None) on anything else anywhere in the file,
and the file then goes through tomllib: a document is either in the subset, where the
result is tomllib's (fuzzed in tests/test_recorder_startup.py), or parsed (and rejected)
by tomllib itself. So the recorder never accepts what tomllib refuses, and a typo still
refuses the session.
"""

from __future__ import annotations

from sshaudit.agent.protocol import Frozen, StrCode, member
from sshaudit.errors import ConfigError

# typing costs start time at every login: it is imported for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar


DEFAULT_CONFIG = "/etc/sshaudit/agent.toml"
DEFAULT_SOCKET = "/run/sshaudit/agent.sock"
_MAX_CONFIG = 1 << 20  # no agent config is anywhere near 1 MiB


class DownPolicy(StrCode):
    """What a session does when the daemon cannot be reached (DESIGN.md "The recorder").
    (A StrCode, not an Enum: enum costs ~5 ms at every login; agent/protocol.py.)"""

    DENY: ClassVar[DownPolicy] = member("deny")
    ALLOW: ClassVar[DownPolicy] = member("allow")


DEFAULT_HANDSHAKE_TIMEOUT = 30.0


class RecorderConfig(Frozen):
    __slots__ = (  # noqa: RUF023 (init order)
        "socket",
        "on_daemon_down",
        "break_glass_users",
        "handshake_timeout",
    )
    socket: str
    on_daemon_down: DownPolicy
    break_glass_users: frozenset[str]
    handshake_timeout: float

    def __init__(
        self,
        socket: str = DEFAULT_SOCKET,
        on_daemon_down: DownPolicy = DownPolicy.DENY,
        break_glass_users: frozenset[str] = frozenset(),
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__(socket, on_daemon_down, break_glass_users, handshake_timeout)

    def may_run_unrecorded(self, user: str) -> bool:
        """Whether ``user`` gets a session when recording is impossible."""
        return self.on_daemon_down is DownPolicy.ALLOW or user in self.break_glass_users


def parse(text: str, source: str = "config") -> RecorderConfig:
    """The recorder's view of an agent config document."""
    doc = lean_toml(text)
    if doc is None:
        doc = _full_toml(text, source)
    sock = doc.get("socket", DEFAULT_SOCKET)
    if not isinstance(sock, str) or not sock.startswith("/") or "\0" in sock:
        raise ConfigError(f"{source}: socket must be an absolute path")
    policy: Any = doc.get("policy", {})
    if not isinstance(policy, dict):
        raise ConfigError(f"{source}: [policy] must be a table")
    down = policy.get("on_daemon_down", DownPolicy.DENY.value)
    try:
        on_down = DownPolicy(down)
    except ValueError:
        raise ConfigError(
            f'{source}: policy.on_daemon_down must be "deny" or "allow", not {down!r}'
        ) from None
    users = policy.get("break_glass_users", [])
    if not isinstance(users, list) or not all(isinstance(u, str) and u for u in users):
        raise ConfigError(f"{source}: policy.break_glass_users must be a list of user names")
    timeout = policy.get("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigError(f"{source}: policy.handshake_timeout must be a number of seconds")
    if not 0 < timeout <= 600:
        raise ConfigError(f"{source}: policy.handshake_timeout must be in (0, 600]")
    return RecorderConfig(sock, on_down, frozenset(users), float(timeout))


def _full_toml(text: str, source: str) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc


def load(path: str) -> RecorderConfig:
    """Read and parse the config file at ``path``."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_CONFIG + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > _MAX_CONFIG:
        raise ConfigError(f"{path}: larger than {_MAX_CONFIG} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8") from exc
    return parse(text, path)


# -- the TOML subset (see the module docstring) -------------------------------------------

_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS = frozenset("0123456789")
# TOML 1.0 allows no control character but tab, outside multi-line strings (which the
# subset does not take): a stray one, or a CR that does not end a line, goes to tomllib.
_CONTROL = frozenset(chr(c) for c in (*range(0x09), *range(0x0B, 0x20), 0x7F))
_MAX_DIGITS = 18  # fits a TOML 64-bit integer; longer numbers go to tomllib


class _Unsupported(Exception):  # noqa: N818 (not an error: the cue to use tomllib)
    """Outside the subset: tomllib decides."""


def lean_toml(text: str) -> dict[str, Any] | None:
    """``tomllib.loads(text)`` when ``text`` is in the subset, else None (never raises)."""
    text = text.replace("\r\n", "\n")
    if not _CONTROL.isdisjoint(text):
        return None
    try:
        return _Subset(text).document()
    except _Unsupported:
        return None


class _Subset:
    """A recursive-descent reader of the subset over ``text`` (CRLF already made LF)."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def _peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def _spaces(self) -> None:
        while self._peek() in (" ", "\t"):
            self.i += 1

    def _comment(self) -> None:
        if self._peek() == "#":
            end = self.s.find("\n", self.i)
            self.i = len(self.s) if end < 0 else end

    def _line_end(self) -> None:
        """Optional spaces and comment, then a newline or the end of the text."""
        self._spaces()
        self._comment()
        if self.i < len(self.s):
            if self.s[self.i] != "\n":
                raise _Unsupported
            self.i += 1

    def _key(self) -> str:
        start = self.i
        while self._peek() in _BARE_KEY:  # "" (the end) is not in it
            self.i += 1
        if self.i == start:
            raise _Unsupported  # quoted, dotted or missing keys: tomllib
        return self.s[start : self.i]

    def document(self) -> dict[str, Any]:
        root: dict[str, Any] = {}
        table = root
        while True:
            self._spaces()
            if self.i >= len(self.s):
                return root
            if self.s[self.i] == "[":  # a table header: [name] only, no [[arrays]] or [a.b]
                self.i += 1
                name = self._key()
                if self._peek() != "]" or name in root:  # redefinitions: tomllib's error
                    raise _Unsupported
                self.i += 1
                table = root[name] = {}
            elif self.s[self.i] not in "#\n":
                key = self._key()
                self._spaces()
                if self._peek() != "=":
                    raise _Unsupported
                self.i += 1
                self._spaces()
                value = self._value(in_array=False)
                if key in table:
                    raise _Unsupported
                table[key] = value
            self._line_end()

    def _value(self, in_array: bool) -> Any:
        c = self._peek()
        if c in ('"', "'"):
            return self._string(c)
        if c == "[" and not in_array:
            return self._array()
        for word, value in (("true", True), ("false", False)):
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return value
        if c in _DIGITS:
            return self._number()
        raise _Unsupported  # signs, inf/nan, dates, inline tables, nested arrays...

    def _string(self, quote: str) -> str:
        end = self.s.find(quote, self.i + 1)
        if end < 0:
            raise _Unsupported
        body = self.s[self.i + 1 : end]
        if "\n" in body or (quote == '"' and "\\" in body):  # escapes: tomllib
            raise _Unsupported
        self.i = end + 1  # '''/""" (multi-line) leave a quote behind: refused after
        return body

    def _digits(self) -> str:
        start = self.i
        while self._peek() in _DIGITS:
            self.i += 1
        return self.s[start : self.i]

    def _number(self) -> int | float:
        whole = self._digits()
        if len(whole) > 1 and whole[0] == "0":  # leading zeros are not TOML
            raise _Unsupported
        if self._peek() != ".":
            if len(whole) > _MAX_DIGITS:
                raise _Unsupported
            return int(whole)
        self.i += 1
        fraction = self._digits()
        if not fraction or len(whole) + len(fraction) > _MAX_DIGITS:
            raise _Unsupported
        return float(f"{whole}.{fraction}")

    def _array_gap(self) -> None:
        """Whitespace, newlines and comments, as TOML allows them inside arrays."""
        while True:
            self._spaces()
            self._comment()
            if self._peek() != "\n":
                return
            self.i += 1

    def _array(self) -> list[Any]:
        self.i += 1  # "["
        items: list[Any] = []
        while True:
            self._array_gap()
            if self._peek() == "]":
                self.i += 1
                return items
            items.append(self._value(in_array=True))
            self._array_gap()
            if self._peek() == ",":
                self.i += 1
            elif self._peek() != "]":
                raise _Unsupported
