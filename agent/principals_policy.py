"""The principals command's decision, sans-IO: which principals may log in as a unix user.

sshd runs the AuthorizedPrincipalsCommand (sshd_config(5)) for every certificate login and
accepts the certificate when one of its principals equals a line the command printed. This
module computes those lines from the cached policy (/work/notes issue 5, "The policy
document": ``principals.email_prefix``, ``map``, ``files_dir``, ``any``) and says whether
sshd will accept, and why, for the authentication log.

Invariants:
- pure: no files, sockets or clocks; the per-user principals file comes through the
  ``read_file`` callable (the caller checks ownership and bounds its size);
- fail closed: a missing or mistyped policy, an odd user name, no certificate or a
  malformed one all give a denial with a reason, never an exception;
- a denial prints nothing; an allowance prints the union of the rules' principals,
  deduplicated in rule order (email_prefix, map, files_dir, any);
- nothing printed contains whitespace, a control character or a leading ``#``: sshd reads
  each line as ``[options] principal`` (the text before the last blank is key options,
  sshd(8) AUTHORIZED_KEYS FILE FORMAT), so a principal with a blank in it, from a
  certificate under the ``any`` rule, could otherwise smuggle options like ``command=``;
- lean: standard library only, and only cheap modules (it runs at every login attempt;
  agent/protocol.py explains why :class:`Frozen` stands in for a frozen dataclass).
"""

from __future__ import annotations

from sshaudit.agent.protocol import Frozen
from sshaudit.errors import FormatError

TYPE_CHECKING = False  # not from typing: importing typing costs ~13 ms per attempt
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

USER_CERT = 1  # PROTOCOL.certkeys: SSH2_CERT_TYPE_USER
MAX_PRINCIPALS = 256  # OpenSSH's SSHKEY_CERT_MAX_PRINCIPALS: sshd refuses more
MAX_PRINCIPAL = 256  # bytes; longer lines are not principals anyone issues
MAX_USER = 32  # bytes (useradd(8) on Linux)
MAX_FILE_BYTES = 64 * 1024
MAX_FILE_LINES = 1000
MAX_SHOWN = 8  # principals quoted in a reason

# certificate key type -> (plain key type, number of key-specific string/mpint fields),
# PROTOCOL.certkeys; agent/sshcert.py uses it too (this module stays lean for the login path)
CERT_TYPES: dict[str, tuple[str, int]] = {
    "ssh-rsa-cert-v01@openssh.com": ("ssh-rsa", 2),  # e, n
    "ssh-dss-cert-v01@openssh.com": ("ssh-dss", 4),  # p, q, g, y
    "ecdsa-sha2-nistp256-cert-v01@openssh.com": ("ecdsa-sha2-nistp256", 2),  # curve, Q
    "ecdsa-sha2-nistp384-cert-v01@openssh.com": ("ecdsa-sha2-nistp384", 2),
    "ecdsa-sha2-nistp521-cert-v01@openssh.com": ("ecdsa-sha2-nistp521", 2),
    "ssh-ed25519-cert-v01@openssh.com": ("ssh-ed25519", 1),  # pk
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com": ("sk-ecdsa-sha2-nistp256@openssh.com", 3),
    "sk-ssh-ed25519-cert-v01@openssh.com": ("sk-ssh-ed25519@openssh.com", 2),  # pk, app
}
_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class Certificate(Frozen):
    """The fields of an OpenSSH user certificate the decision and the log need."""

    __slots__ = ("key_type", "serial", "cert_type", "key_id", "principals")  # noqa: RUF023
    key_type: str
    serial: int
    cert_type: int
    key_id: str
    principals: tuple[str, ...]

    def __init__(
        self, key_type: str, serial: int, cert_type: int, key_id: str, principals: tuple[str, ...]
    ) -> None:
        super().__init__(key_type, serial, cert_type, key_id, principals)


class Decision(Frozen):
    """What to print (one principal per line), and the verdict sshd will reach with it."""

    __slots__ = ("principals", "allowed", "reason", "rule")  # noqa: RUF023
    principals: tuple[str, ...]
    allowed: bool
    reason: str
    rule: str  # the rule that accepted ("email_prefix", "map", "files_dir", "any"), or ""

    def __init__(self, principals: tuple[str, ...], allowed: bool, reason: str, rule: str) -> None:
        super().__init__(principals, allowed, reason, rule)


def deny(reason: str) -> Decision:
    return Decision((), False, reason, "")


# -- certificates (PROTOCOL.certkeys; RFC 4251 section 5 strings) -----------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self._data) - self._pos:
            raise FormatError(f"certificate: {what} runs past the end")
        self._pos += n
        return self._data[self._pos - n : self._pos]

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")  # no struct: one less import

    def string(self, what: str) -> bytes:
        return self.take(self.uint(4, f"{what} length"), what)

    def text(self, what: str) -> str:
        try:
            return self.string(what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"certificate: {what} is not UTF-8") from exc

    @property
    def rest(self) -> int:
        return len(self._data) - self._pos


def parse_certificate(blob: bytes) -> Certificate:
    """Parse a certificate blob; the CA signature is not checked (sshd did, before us)."""
    r = _Reader(blob)
    key_type = r.text("key type")
    if key_type not in CERT_TYPES:
        raise FormatError("certificate: unknown key type")
    r.string("nonce")
    for i in range(CERT_TYPES[key_type][1]):
        r.string(f"public key field {i}")
    serial = r.uint(8, "serial")
    cert_type = r.uint(4, "certificate type")
    key_id = r.text("key id")
    principals = _principals(r.string("valid principals"))
    r.uint(8, "valid after")
    r.uint(8, "valid before")
    for what in ("critical options", "extensions", "reserved", "signature key", "signature"):
        r.string(what)
    if r.rest:
        raise FormatError(f"certificate: {r.rest} bytes after the signature")
    return Certificate(key_type, serial, cert_type, key_id, principals)


def _principals(data: bytes) -> tuple[str, ...]:
    r = _Reader(data)
    out: list[str] = []
    while r.rest:
        if len(out) >= MAX_PRINCIPALS:  # sshd refuses such a certificate too (sshkey.c)
            raise FormatError(f"certificate: more than {MAX_PRINCIPALS} principals")
        out.append(r.text("principal"))
    return tuple(out)


# -- names -------------------------------------------------------------------------------------


def valid_user(name: str) -> bool:
    """A POSIX-portable user name (IEEE 1003.1 3.437 plus a trailing ``$``), <= 32 bytes,
    not starting with ``-`` or ``.``. Checked by hand: ``re`` costs ~8 ms to import."""
    core = name[:-1] if name.endswith("$") else name
    return (
        0 < len(name) <= MAX_USER
        and core[:1] not in ("", "-", ".")
        and all(c in _USER_CHARS for c in core)
    )


def valid_principal(name: str) -> bool:
    """Safe to print as one principal line (see the module docstring)."""
    return (
        0 < len(name) <= MAX_PRINCIPAL
        and name.isprintable()  # no controls, no lone surrogates from surrogateescape
        and not any(c.isspace() for c in name)
        and not name.startswith("#")
        and len(name.encode("utf-8")) <= MAX_PRINCIPAL
    )


def shown(names: Iterable[str]) -> str:
    """A short, printable list for a reason: ``[a, b, ... (+3)]``."""
    items = list(names)
    clean = ["".join(c if c.isprintable() else "?" for c in n[:64]) for n in items[:MAX_SHOWN]]
    more = f", ... (+{len(items) - MAX_SHOWN})" if len(items) > MAX_SHOWN else ""
    return "[" + ", ".join(clean) + more + "]"


# -- the policy --------------------------------------------------------------------------------


class Rules(Frozen):
    """The ``principals`` section of the policy, type-checked (defaults: issue 5 notes)."""

    __slots__ = ("email_prefix", "map", "files_dir", "any")  # noqa: RUF023
    email_prefix: bool
    map: dict[str, tuple[str, ...]]
    files_dir: str | None
    any: bool

    def __init__(
        self,
        email_prefix: bool,
        map: dict[str, tuple[str, ...]],
        files_dir: str | None,
        any: bool,
    ) -> None:
        super().__init__(email_prefix, map, files_dir, any)


def parse_rules(policy: Mapping[str, object]) -> Rules:
    """The rules of a policy document's ``policy`` object; FormatError when mistyped."""
    section = policy.get("principals", {})
    if not isinstance(section, dict):
        raise FormatError("principals is not an object")
    email_prefix, any_ = section.get("email_prefix", True), section.get("any", False)
    if not isinstance(email_prefix, bool) or not isinstance(any_, bool):
        raise FormatError("principals.email_prefix and principals.any must be true or false")
    files_dir = section.get("files_dir")
    if files_dir is not None and not (
        isinstance(files_dir, str) and files_dir.startswith("/") and "\0" not in files_dir
    ):
        raise FormatError("principals.files_dir must be an absolute path or null")
    raw_map = section.get("map", {})
    if not isinstance(raw_map, dict):
        raise FormatError("principals.map is not an object")
    mapping: dict[str, tuple[str, ...]] = {}
    for user, names in raw_map.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise FormatError("principals.map values must be lists of strings")
        mapping[user] = tuple(names)
    return Rules(email_prefix, mapping, files_dir, any_)


def file_principals(text: str | None) -> tuple[tuple[str, ...], str]:
    """The principals in a per-user file, and a note when the file was not used."""
    if text is None:
        return (), ""
    if len(text.encode("utf-8", "surrogateescape")) > MAX_FILE_BYTES:
        return (), f"principals file ignored: larger than {MAX_FILE_BYTES} bytes"
    lines = text.splitlines()
    if len(lines) > MAX_FILE_LINES:
        return (), f"principals file ignored: more than {MAX_FILE_LINES} lines"
    found = (line.strip() for line in lines)
    return tuple(p for p in found if p and not p.startswith("#") and valid_principal(p)), ""


def evaluate(
    policy: Mapping[str, object] | None,
    unix_user: str,
    cert: Certificate | None,
    read_file: Callable[[str], str | None],
) -> Decision:
    """The decision for ``unix_user`` presenting ``cert`` (None: a plain key, or no policy)."""
    if policy is None:
        return deny("no cached policy")
    if not valid_user(unix_user):
        return deny("unknown user form")
    if cert is None:
        return deny("no certificate (plain public key)")
    if cert.cert_type != USER_CERT:
        return deny("malformed certificate: not a user certificate")
    try:
        rules = parse_rules(policy)
    except FormatError as exc:
        return deny(f"cached policy unusable: {exc}")
    accepted: dict[str, str] = {}  # principal -> the first rule that gave it (insertion order)

    def add(names: Iterable[str], rule: str) -> None:
        for name in names:
            if valid_principal(name):
                accepted.setdefault(name, rule)

    if rules.email_prefix:
        add([unix_user], "email_prefix")
    add(rules.map.get(unix_user, ()), "map")
    note = ""
    if rules.files_dir is not None:  # valid_user already refuses "/" and a leading "."
        from_file, note = file_principals(read_file(rules.files_dir.rstrip("/") + "/" + unix_user))
        add(from_file, "files_dir")
    if rules.any:
        add(cert.principals, "any")
    return _verdict(unix_user, cert, accepted, note)


def _verdict(unix_user: str, cert: Certificate, accepted: dict[str, str], note: str) -> Decision:
    match = next((p for p in cert.principals if p in accepted), None)
    if match is None:
        if not cert.principals:
            reason = "certificate has no principals"
        else:
            reason = (
                f"principal mismatch: certificate principals {shown(cert.principals)}, "
                f"user {unix_user!r} accepts {shown(accepted)}"
            )
        return deny(f"{reason}; {note}" if note else reason)
    rule = accepted[match]
    return Decision(tuple(accepted), True, f"principal {match!r} accepted by rule {rule}", rule)
