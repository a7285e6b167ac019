"""Parse OpenSSH 9.2 sshd log messages into authentication observations (sans-IO).

Invariants:
- :func:`parse_line` never raises on any input: non-UTF-8, over-long, control-character or
  unknown lines give ``None``. It reads no clock: the caller passes the time of the line.
- It sees one MESSAGE: what ``sshd -E FILE`` writes (no syslog prefix, no pid, no time) or
  journald's MESSAGE with its ``_PID`` passed as ``pid``. An optional ``error: `` level
  prefix (syslog) and a trailing `` [preauth]`` (a message relayed from the pre-auth child)
  are accepted.
- Formats come from OpenSSH 9.2 as built by Debian 12, checked against real logs in
  tests/golden/authlog (written by tests/golden/authlog/generate.py). Where user-controlled
  text (a user name, a certificate key id) sits beside the address, the patterns anchor on
  the server-generated parts so that a user name like ``x from 6.6.6.6 port 1`` cannot move
  the address: see the comment on :func:`_split_auth`.
- Values are bounded: user names, reasons and key ids are cut to the collector's limits
  (collector/models.py AuthEvent); addresses are valid IPs, ports 0..65535, serials u64.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

MAX_LINE = 4096  # sshd's own log buffer is 1024 bytes (log.c MSGBUFSIZ) plus vis(3) escapes
MAX_USER = 64
MAX_EMAIL = 320
MAX_REASON = 1024
MAX_FINGERPRINT = 128
MAX_SERIAL = (1 << 64) - 1


class Source(StrEnum):
    SSHD_LOG = "sshd_log"
    PRINCIPALS = "principals"
    PAM = "pam"


class Kind(StrEnum):
    """What an observation says about its attempt (the merger decides on these)."""

    CONNECT = "connect"  # "Connection from": an attempt starts
    ACCEPTED = "accepted"  # sshd accepted a method: the connection is authenticated
    FAILED = "failed"  # one method/key failed; more may follow on the same connection
    INVALID_USER = "invalid_user"
    NOT_ALLOWED = "not_allowed"  # AllowUsers/DenyUsers/shell/locked account
    CERT_INVALID = "cert_invalid"  # carries no address: attached by pid or to the next failure
    REFUSED = "refused"  # "Authentication refused:" (StrictModes and the like), no address
    MAX_TRIES = "max_tries"
    CLOSED = "closed"  # the connection ended
    FORWARDING = "forwarding"  # a forwarding request refused (its own event)
    CHILD = "child"  # "User child is on pid N": links a session child's pid to the connection
    DECISION = "decision"  # the principals command's allow/deny
    ACCOUNT = "account"  # PAM account phase
    SESSION_OPEN = "session_open"  # PAM open_session: the login went through


@dataclass(frozen=True)
class Observation:
    """Partial knowledge about one authentication attempt from one source."""

    source: Source
    time: datetime
    kind: Kind
    client_address: str = ""
    client_port: int | None = None
    unix_user: str = ""
    method: str = ""
    allowed: bool | None = None
    reason: str = ""
    user_email: str = ""  # a certificate's key id (the CA puts the email there)
    cert_serial: int | None = None
    cert_fingerprint: str = ""
    ca_fingerprint: str = ""
    pid: int | None = None
    child_pid: int | None = None
    rule: str = ""
    session_id: str | None = None


_IP = r"(?P<ip>[0-9A-Fa-f.:]{2,45}(?:%[\w.-]{1,16})?)"
_PORT = r"port (?P<port>\d{1,5})"
_TAIL = r"(?: \[preauth\])?"
_FP = r"SHA256:[A-Za-z0-9+/]{43}"
_KEYINFO = re.compile(
    rf"(?P<ktype>[A-Z0-9-]{{2,32}}) (?P<fp>{_FP})"
    rf"(?: ID (?P<kid>.*) \(serial (?P<serial>\d{{1,20}})\) CA [A-Z0-9-]{{2,32}} (?P<cafp>{_FP}))?"
)
_AUTH_HEAD = re.compile(r"(?P<verdict>Accepted|Failed) (?P<method>[a-z0-9/@.-]{1,40}) for ")
_AUTH_ADDR = re.compile(rf" from {_IP} {_PORT} ssh2(?=$|: | \[preauth\]$)")
_LINES: tuple[tuple[Kind, re.Pattern[str]], ...] = (
    (Kind.INVALID_USER, re.compile(rf"Invalid user (?P<user>.*) from {_IP} {_PORT}{_TAIL}")),
    (
        Kind.NOT_ALLOWED,
        re.compile(rf"User (?P<user>\S+) from {_IP} not allowed because (?P<why>.{{1,200}})"),
    ),
    (Kind.CERT_INVALID, re.compile(rf"Certificate invalid: (?P<why>.{{1,200}}?){_TAIL}")),
    (Kind.REFUSED, re.compile(rf"Authentication refused: (?P<why>.{{1,300}}?){_TAIL}")),
    (
        Kind.MAX_TRIES,
        re.compile(
            rf"maximum authentication attempts exceeded for (?P<inv>invalid user )?"
            rf"(?P<user>.*) from {_IP} {_PORT} ssh2{_TAIL}"
        ),
    ),
    (
        Kind.CLOSED,
        re.compile(
            r"(?:Connection closed by|Disconnected from|Disconnecting)"
            rf" (?:(?:authenticating|invalid) user (?P<user>.*) |user (?P<user2>.*) )?"
            rf"{_IP} {_PORT}(?::.{{0,200}})?{_TAIL}"
        ),
    ),
    (Kind.CONNECT, re.compile(rf"Connection from {_IP} {_PORT} on .{{1,120}}")),
    (Kind.CHILD, re.compile(r"User child is on pid (?P<child>\d{1,10})")),
)
_FORWARDING: tuple[re.Pattern[str], ...] = (
    # serverloop.c server_request_direct_tcpip / _streamlocal (AllowTcpForwarding and co.).
    re.compile(r"refused (?:local|streamlocal) port forward: originator .{1,300}"),
    # channels.c channel_connect_to_port / channel_connect_to_path / the remote forward
    # check (PermitOpen, PermitListen); Debian 12 adds "from ADDR port P".
    re.compile(
        rf"Received request (?:from {_IP} {_PORT} )?to (?:connect to|remote forward to)"
        r" (?:host|path) .{1,300}, but the request was denied\."
    ),
    # Not here because 9.2 logs them only at DEBUG (tests/golden/authlog/forwarding-refused.log
    # shows nothing for them at VERBOSE): agent and X11 refusals, tunnel refusals, and remote
    # forwards refused by AllowTcpForwarding (the client only gets "Server has disabled ...").
)


def parse_line(text: str | bytes, now: datetime, pid: int | None = None) -> Observation | None:
    """One sshd MESSAGE -> an observation, or None when it is not about authentication."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return _parse(text, now, pid)
    except (UnicodeDecodeError, ValueError, OverflowError):
        return None


def _parse(text: str, now: datetime, pid: int | None) -> Observation | None:
    text = text.rstrip("\r\n")
    if len(text) > MAX_LINE or not text.isprintable():
        return None  # sshd vis(3)-escapes control characters: a raw one means not sshd
    text = text.removeprefix("error: ")
    base = Observation(Source.SSHD_LOG, now, Kind.CONNECT, pid=pid)
    if _AUTH_HEAD.match(text):
        return _auth(text, base)
    for kind, pattern in _LINES:
        m = pattern.fullmatch(text)
        if m is not None:
            return _build(kind, m, base)
    for pattern in _FORWARDING:
        m = pattern.fullmatch(text)
        if m is not None:
            return _forwarding(text, m, base)
    return None


def _build(kind: Kind, m: re.Match[str], base: Observation) -> Observation | None:
    groups = m.groupdict()
    user = groups.get("user") or groups.get("user2") or ""
    obs = _with_address(base, groups.get("ip"), groups.get("port"))
    if obs is None:
        return None
    reason = _reason(kind, groups.get("why") or "")
    allowed = None if kind in (Kind.CONNECT, Kind.CLOSED, Kind.CHILD) else False
    child = int(groups["child"]) if groups.get("child") else None
    return _replace(
        obs,
        kind=kind,
        unix_user=_cut(user, MAX_USER),
        reason=reason,
        allowed=allowed,
        child_pid=child,
    )


def _reason(kind: Kind, why: str) -> str:
    text = {
        Kind.INVALID_USER: "unknown user",
        Kind.NOT_ALLOWED: f"user not allowed because {why}",
        Kind.CERT_INVALID: f"certificate invalid: {why}",
        Kind.REFUSED: f"authentication refused: {why}",
        Kind.MAX_TRIES: "maximum authentication attempts exceeded",
    }.get(kind, "")
    return _cut(text, MAX_REASON)


def _split_auth(rest: str) -> tuple[str, re.Match[str], str] | None:
    """Split ``U from IP port P ssh2[: KEYINFO]`` at the right " from ".

    The user name (for an invalid user, anything the client sent) and a certificate's key id
    (anything its issuer wrote) can both contain " from 1.2.3.4 port 5 ssh2". A real account
    name has no spaces, so the leftmost split whose remainder is exactly a key description is
    the true one for valid users; for invalid users the address is as reliable as the client.
    """
    for addr in _AUTH_ADDR.finditer(rest):
        tail = rest[addr.end() :].removesuffix(" [preauth]")
        if tail == "" or (tail.startswith(": ") and _KEYINFO.fullmatch(tail[2:])):
            return rest[: addr.start()], addr, tail.removeprefix(": ")
    return None


def _auth(text: str, base: Observation) -> Observation | None:
    head = _AUTH_HEAD.match(text)
    assert head is not None
    split = _split_auth(text[head.end() :])
    if split is None:
        return None
    user, addr, keyinfo = split
    invalid = user.startswith("invalid user ")
    user = user.removeprefix("invalid user ")
    obs = _with_address(base, addr["ip"], addr["port"])
    if obs is None or not user:
        return None
    accepted = head["verdict"] == "Accepted"
    method = head["method"]
    key = _KEYINFO.fullmatch(keyinfo) if keyinfo else None
    fields: dict[str, object] = {}
    if key is not None:
        fields["cert_fingerprint"] = key["fp"]
        if key["cafp"]:
            method = "certificate"  # DESIGN.md "Authentication event fields" method values
            fields.update(
                user_email=_cut(key["kid"], MAX_EMAIL),
                cert_serial=_serial(key["serial"]),
                ca_fingerprint=key["cafp"],
            )
    reason = "" if accepted else ("unknown user" if invalid else _failed_reason(method))
    return _replace(
        obs,
        kind=Kind.ACCEPTED if accepted else Kind.FAILED,
        unix_user=_cut(user, MAX_USER),
        method=_method(method),
        allowed=accepted,
        reason=reason,
        **fields,
    )


def _failed_reason(method: str) -> str:
    return {
        "publickey": "public key not authorized",
        "certificate": "certificate not accepted",
        "password": "wrong password",
    }.get(method, f"{_method(method)} authentication failed")


def _forwarding(text: str, m: re.Match[str], base: Observation) -> Observation | None:
    groups = m.groupdict()
    obs = _with_address(base, groups.get("ip"), groups.get("port"))
    if obs is None:
        return None
    return _replace(
        obs,
        kind=Kind.FORWARDING,
        method="forwarding",
        allowed=False,
        reason=_cut(text.removesuffix(" [preauth]"), MAX_REASON),
    )


def _with_address(obs: Observation, ip: str | None, port: str | None) -> Observation | None:
    if ip is None:
        return obs
    try:
        address = str(ipaddress.ip_address(ip))
    except ValueError:
        return None
    number = int(port) if port is not None else None
    if number is not None and number > 65535:
        return None
    return _replace(obs, client_address=address, client_port=number)


def _method(name: str) -> str:
    # The collector takes [a-z0-9][a-z0-9_-]{0,31}: "keyboard-interactive/pam" -> "...-pam".
    cleaned = re.sub(r"[^a-z0-9_-]", "-", name.lower())[:32]
    return cleaned if cleaned[:1].isalnum() else ""


def _serial(text: str) -> int | None:
    value = int(text)
    return value if value <= MAX_SERIAL else None


def _cut(text: str, limit: int) -> str:
    return text.replace("\x00", "")[:limit]


def _replace(obs: Observation, **changes: object) -> Observation:
    return replace(obs, **changes)  # type: ignore[arg-type]
