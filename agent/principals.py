"""The AuthorizedPrincipalsCommand: sshd runs it at every certificate login attempt.

    principals --policy FILE --socket SOCK [--timeout SECONDS] %u %t %k %i %s %f [%C]

sshd_config(5) TOKENS: %u the unix user, %t the certificate key type, %k the certificate
(base64), %i its key id, %s its serial, %f the certified key's fingerprint. An optional
connection word (%C: "client-addr client-port server-addr server-port", as one word or
four) is taken when given, but OpenSSH 9.2 refuses %C for this command ("percent_expand:
unknown key %C", the connection is dropped): enroll does not pass it, and the daemon finds
the client's address from sshd's monitor process instead.

It prints the principals allowed for %u (agent/principals_policy.py decides, from the
policy the daemon cached) one per line on stdout, then sends ONE authentication
observation (agent/protocol.py framing, MsgType.AUTH, a JSON object) to the agent daemon.

Invariants:
- a denial prints nothing and exits 0 (sshd then refuses and logs it); only a bad option
  (the admin's command line, not sshd's tokens) exits 2, with one line on stderr;
- any odd token (too long, not UTF-8, not the expected form, disagreeing with the
  certificate, missing, extra) is a denial, never a traceback: main() guards everything;
- the decision is written before the daemon is contacted, and everything after start-up
  is bounded by ``--timeout`` (default 0.2 s) whatever the daemon does: the report gets
  what the decision left of it; the content of any answer is ignored and every failure is
  swallowed (sshd's own log still records the attempt);
- the policy file and the per-user principals files are used only when root-owned and not
  group/world-writable; files are opened without following links and never block (FIFOs);
- standard library only, cheap modules only (no json, re, typing, dataclasses, socket,
  base64, hashlib): this runs on every attempt; start with ``python3 -I -S``.
"""

from __future__ import annotations

import _socket  # not socket: its enums cost milliseconds per attempt
import binascii  # not base64: it imports re (~8 ms)
import os
import sys
import time

from sshaudit.agent.principals_policy import (
    CERT_TYPES,
    Certificate,
    Decision,
    deny,
    evaluate,
    parse_certificate,
    valid_user,
)
from sshaudit.agent.protocol import Frozen, MsgType, encode, json_dumps, json_loads
from sshaudit.errors import FormatError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

DEFAULT_POLICY = "/var/lib/sshaudit/policy.json"
DEFAULT_SOCKET = "/run/sshaudit/agent.sock"
DEFAULT_TIMEOUT = 0.2
MAX_POLICY = 1 << 20
MAX_KEY_B64 = 128 * 1024  # MAX_ARG_STRLEN (execve(2)): the most sshd can pass in one word
MAX_KEY_ID = 320  # bytes: an email address (RFC 5321: 64 + 1 + 255)
MAX_REPORTED = 512  # characters of any one field sent to the daemon
_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_ADDR = frozenset("0123456789abcdefABCDEF.:%")

USAGE = """\
usage: principals --policy FILE --socket SOCK [--timeout SECONDS] %u %t %k %i %s %f

sshd's AuthorizedPrincipalsCommand (sshd_config(5)): prints the principals allowed to log
in as %u from the cached policy, one per line, and reports the decision to the agent daemon
(at most --timeout seconds, default 0.2). Prints nothing (a denial) on any odd input.
"""


class Options(Frozen):
    """The admin's options (before sshd's tokens)."""

    __slots__ = ("policy", "socket", "timeout")
    policy: str
    socket: str
    timeout: float

    def __init__(self, policy: str, socket: str, timeout: float) -> None:
        super().__init__(policy, socket, timeout)


def parse_options(argv: Sequence[str]) -> tuple[Options, list[str]] | str:
    """The options and the token words, or a usage message. Options come first only:
    a token such as a key id reading ``--help`` is a token."""
    opts = {"--policy": DEFAULT_POLICY, "--socket": DEFAULT_SOCKET, "--timeout": ""}
    args = list(argv)
    if args in (["-h"], ["--help"]):
        return USAGE
    while args and args[0] in opts:
        if len(args) < 2 or not args[1]:
            return f"principals: {args[0]} needs a value\n"
        name, value = args.pop(0), args.pop(0)
        opts[name] = value
    timeout = DEFAULT_TIMEOUT
    if opts["--timeout"]:
        try:
            timeout = float(opts["--timeout"])
        except ValueError:
            timeout = -1.0
        if not 0.001 <= timeout <= 10.0:  # also refuses NaN
            return "principals: --timeout must be 0.001 to 10 seconds\n"
    return Options(opts["--policy"], opts["--socket"], timeout), args


def clean(text: str, limit: int = MAX_REPORTED) -> str:
    """A field fit for the log: at most ``limit`` characters, non-printables (and the lone
    surrogates of undecodable bytes) as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class Attempt(Frozen):
    """What the tokens say about the attempt (reported even when they do not add up)."""

    __slots__ = (  # noqa: RUF023 (field order: __init__'s)
        "words",
        "unix_user",
        "key_type",
        "key",
        "key_id",
        "serial",
        "fp",
        "address",
        "port",
    )
    words: int  # how many token words sshd passed
    unix_user: str
    key_type: str
    key: str
    key_id: str
    serial: int | None
    fp: str
    address: str
    port: int | None

    def __init__(self, *values: object) -> None:  # see parse_attempt
        super().__init__(*values)

    def problem(self) -> str:
        """Why the tokens are unusable, or ""."""
        if self.words < 6:
            return "bad arguments: missing tokens"
        if self.words not in (6, 7, 10) or (self.words > 6 and self.port is None):
            return "bad arguments: unexpected connection tokens"
        checks = (
            (valid_user(self.unix_user), "unknown user form"),
            (self.key_type in CERT_TYPES, "no certificate (not a certificate key type)"),
            (_printable(self.key_id, MAX_KEY_ID), "bad arguments: key id"),
            (self.serial is not None, "bad arguments: serial"),
            (_fingerprint(self.fp), "bad arguments: fingerprint"),
            (0 < len(self.key) <= MAX_KEY_B64, "malformed certificate: size"),
        )
        return next((reason for ok, reason in checks if not ok), "")

    def certificate(self) -> Certificate | str:
        """The certificate in %k, checked against %t, %i and %s; or why it is malformed."""
        try:
            cert = parse_certificate(binascii.a2b_base64(self.key, strict_mode=True))
        except (binascii.Error, ValueError):
            return "malformed certificate: not base64"
        except FormatError as exc:
            return f"malformed {exc}"
        if (cert.key_type, cert.key_id, cert.serial) != (self.key_type, self.key_id, self.serial):
            return "malformed certificate: it disagrees with the key type, key id or serial"
        return cert


def parse_attempt(words: Sequence[str]) -> Attempt:
    user, key_type, key, key_id, serial, fp = [*words[:6], *[""] * (6 - len(words[:6]))]
    number = int(serial) if _decimal(serial, 20) else None
    address, port = "", None
    rest = " ".join(words[6:]).split(" ")  # %C: one word of four, or four words
    if len(rest) == 4 and _address(rest[0]) and _decimal(rest[1], 5) and int(rest[1]) < 65536:
        address, port = rest[0], int(rest[1])
    serial_ok = number is not None and number < 1 << 64
    return Attempt(
        len(words), user, key_type, key, key_id, number if serial_ok else None, fp, address, port
    )


def _decimal(text: str, digits: int) -> bool:
    return 0 < len(text) <= digits and text.isascii() and text.isdigit()


def _address(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c in _ADDR for c in text)


def _printable(text: str, limit: int) -> bool:
    return len(text) <= limit and text.isprintable() and len(text.encode("utf-8")) <= limit


def _fingerprint(text: str) -> bool:
    """``SHA256:`` + 43 characters of unpadded base64 (sshd's default FingerprintHash)."""
    digest = text.removeprefix("SHA256:")
    return len(text) == 50 and len(digest) == 43 and all(c in _B64 for c in digest)


def observation(attempt: Attempt, decision: Decision) -> dict[str, object]:
    """The AUTH message's fields (issue 5 notes, "Auth observations"), time excepted."""
    return {
        "source": "principals",
        "client_address": attempt.address,
        "client_port": attempt.port,
        "unix_user": clean(attempt.unix_user, 64),
        "method": "certificate",
        "allowed": decision.allowed,
        "reason": clean(decision.reason),
        "user_email": clean(attempt.key_id, MAX_KEY_ID),
        "cert_serial": attempt.serial,
        "cert_fingerprint": clean(attempt.fp, 64),
        "rule": decision.rule,
    }


def encode_observation(fields: dict[str, object], now: float) -> bytes:
    """One AUTH frame. The time is a JSON number written by hand: protocol.json_dumps
    passes floats to the json package, whose import costs ~10 ms per attempt."""
    body = json_dumps(fields)  # str, int, bool and None only: the lean path
    return encode(MsgType.AUTH, ('{"time":' + float.__repr__(now) + "," + body[1:]).encode())


def send(path: str, frame: bytes, timeout: float, clock: Callable[[], float]) -> bool:
    """Connect, send and half-close within ``timeout`` seconds in all; True once sent.

    Then it stays, within the same bound, until the daemon answers or closes: the daemon
    checks who sent an AUTH message (SO_PEERCRED, then this process's parent in /proc,
    agent/peer.py check_principals_peer), which needs this process still alive. Nothing in
    the answer is used."""
    deadline = clock() + timeout
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        sock.settimeout(timeout)  # a daemon whose backlog is full fails here (EAGAIN)
        sock.connect(path)
        left = deadline - clock()
        if left <= 0:
            return False
        sock.settimeout(left)  # a daemon that never reads: the frame fits the socket buffer
        sock.sendall(frame)
        sock.shutdown(_socket.SHUT_WR)  # a daemon reading to EOF has the whole message
    except OSError:
        sock.close()
        return False
    try:
        left = deadline - clock()
        if left > 0:
            sock.settimeout(left)
            sock.recv(64)  # an answer, EOF, or the bound
    except OSError:
        pass
    finally:
        sock.close()
    return True


def _open_root_file(path: str, limit: int) -> bytes | None:
    """The first ``limit + 1`` bytes of a root-owned, not group/world-writable regular file
    (a principals file someone else can write would let them in), or None."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) != 0o100000 or st.st_uid != 0 or st.st_mode & 0o022:
            return None  # (stat.S_ISREG without the stat module)
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_principals_file(path: str) -> str | None:
    """A per-user principals file, when it and its directory are root's alone."""
    try:
        st = os.stat(path.rpartition("/")[0] or "/")  # noqa: PTH116 (pathlib: start time)
    except OSError:
        return None
    if st.st_uid != 0 or st.st_mode & 0o022:
        return None
    data = _open_root_file(path, 64 * 1024)
    return None if data is None else data.decode("utf-8", "surrogateescape")


def load_policy(path: str) -> tuple[Mapping[str, object] | None, str]:
    """The ``policy`` object of the daemon's policy.json, or None and why."""
    if not os.path.exists(path):  # noqa: PTH110 (no pathlib: start time)
        return None, "no cached policy"
    data = _open_root_file(path, MAX_POLICY)
    if data is None:
        return None, "cached policy unreadable or not root's"
    if len(data) > MAX_POLICY:
        return None, "cached policy too large"
    try:
        doc = json_loads(data.decode("utf-8"))
    # SystemError: CPython 3.11's _json scanner reports a syntax error through
    # json.decoder.JSONDecodeError, taken from sys.modules without importing it; when json
    # was never imported (as here, on purpose) it fails with a SystemError instead.
    except (UnicodeDecodeError, ValueError, RecursionError, SystemError):
        return None, "cached policy is not JSON"
    policy = doc.get("policy") if isinstance(doc, dict) else None
    if not isinstance(policy, dict):
        return None, "cached policy has no policy object"
    return policy, ""


def decide(options: Options, words: Sequence[str]) -> tuple[Attempt, Decision]:
    attempt = parse_attempt(words)
    problem = attempt.problem()
    if problem:
        return attempt, deny(problem)
    cert = attempt.certificate()
    if isinstance(cert, str):
        return attempt, deny(cert)
    policy, why = load_policy(options.policy)
    if policy is None:
        return attempt, deny(why)
    return attempt, evaluate(policy, attempt.unix_user, cert, read_principals_file)


def write_out(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run(
    argv: Sequence[str],
    out: Callable[[bytes], None],
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> int:
    parsed = parse_options(argv)
    if isinstance(parsed, str):
        sys.stderr.write(parsed)
        return 0 if parsed is USAGE else 2
    options, words = parsed
    started = clock()
    attempt, decision = decide(options, words)
    if decision.allowed and decision.principals:
        try:  # noqa: SIM105 (contextlib costs start time)
            out("".join(p + "\n" for p in decision.principals).encode("utf-8"))
        except OSError:  # sshd went away: nothing left to tell it
            pass
    left = options.timeout - (clock() - started)
    if left > 0:
        send(
            options.socket, encode_observation(observation(attempt, decision), wall()), left, clock
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command; exit status 0 (2 for a bad option), never a traceback."""
    try:
        return run(sys.argv[1:] if argv is None else argv, lambda b: write_out(1, b))
    except BaseException:  # a crash must read as a denial, nothing more
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
