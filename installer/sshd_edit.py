"""The sshd_config(5) edits of ``sshaudit-agent enroll``: pure ``str -> str`` functions.

Invariants:
- sshd uses the *first* value it obtains for a keyword (sshd_config(5): "Unless noted otherwise,
  for each parameter, the first obtained value will be used"), except inside ``Match`` blocks,
  whose values override. So our settings win by coming first: either a drop-in that the main
  config includes before any of our keywords appears (``find_dropin_dir``), or a marked block
  at the very top of sshd_config (``add_block``). Match blocks are checked in sshd_check.py.
- ``remove_block(add_block(t, s)) == t`` byte for byte for every text without our markers, and
  ``add_block`` is idempotent (an existing block is replaced, never duplicated).
- Every value is checked before it is written: no control characters, and what sshd will read
  back (servconf.c strdelim + argv_split, mirrored in sshd_parse.py) is exactly the value meant.
  Anything else is a ConfigError, never a config sshd would read differently.
- Texts are ``str``; callers decode file bytes with ``surrogateescape`` (files.read_text) so any
  byte survives the round trip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sshaudit.errors import ConfigError

from .sshd_parse import iter_directives, lines_keepends, split_args, split_directive

BLOCK_BEGIN = "# BEGIN sshaudit (managed by sshaudit-agent enroll; do not edit)"
BLOCK_END = "# END sshaudit"
DROPIN_NAME = "00-sshaudit.conf"
DROPIN_HEADER = (
    "# Managed by sshaudit-agent enroll; do not edit (sshaudit-agent unenroll removes it).\n"
    "# Why each setting: docs/sshd-setup.md. sshd keeps the first value it reads, so this\n"
    "# file sorts first in the Include directory.\n"
)
SSHDIR = Path("/etc/ssh")  # OpenSSH's SSHDIR on Debian and RHEL: relative Include base

# Keywords (lower-cased) that render_settings writes; a value for one of them that sshd reads
# before ours wins over ours.
OUR_KEYWORDS = frozenset(
    {
        "trustedusercakeys",
        "authorizedprincipalscommand",
        "authorizedprincipalscommanduser",
        "exposeauthinfo",
        "permituserrc",
        "permituserenvironment",
        "setenv",
        "forcecommand",
        "allowtcpforwarding",
        "allowstreamlocalforwarding",
        "allowagentforwarding",
        "x11forwarding",
        "permittunnel",
    }
)

_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class SshdSettings:
    """What enroll writes. ``principals_command`` is the full command line with its sshd tokens
    (``%u %t %k %i %s %f %C``); ``setenv`` holds extra ``NAME=VALUE`` pairs merged from an
    existing top-level ``SetEnv`` (ours comes first, so theirs would otherwise be ignored)."""

    force_command: str
    trusted_ca_file: str
    principals_command: str
    principals_user: str
    tcp: bool = False
    agent: bool = False
    x11: bool = False
    tunnel: bool = False
    streamlocal: bool = False
    setenv: tuple[str, ...] = ()
    # Certificates only (issue 5: "a recorded, certificate-only SSH server"): no
    # authorized_keys, no passwords. Off keeps the host's other methods as they are.
    certificate_only: bool = False


def _check_plain(what: str, value: str) -> None:
    if not value:
        raise ConfigError(f"{what}: empty value")
    if _CONTROL_RE.search(value):
        raise ConfigError(f"{what}: control characters (newline, NUL, ...) in {value!r}")
    if value != value.strip():
        raise ConfigError(f"{what}: leading or trailing whitespace in {value!r}")


def _quote(what: str, word: str) -> str:
    """One argv_split word for ``word``: as is when plain, else double-quoted with ``\\`` before
    ``"`` and ``\\`` (misc.c argv_split unescapes exactly those)."""
    _check_plain(what, word)
    if not re.search(r"[\s\"'\\#]", word):
        return word
    quoted = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if split_args(quoted) != [word]:  # pragma: no cover - guards the quoting rule itself
        raise ConfigError(f"{what}: cannot quote {word!r} for sshd_config")
    return quoted


def _command(what: str, value: str) -> str:
    """A raw rest-of-line value (ForceCommand, AuthorizedPrincipalsCommand): sshd keeps the text
    as written but still runs argv_split over it, so quotes must balance."""
    _check_plain(what, value)
    words = split_args(value)  # raises ConfigError on unbalanced quotes
    if not words or split_directive(f"X {value}") != ("X", value):
        raise ConfigError(f"{what}: sshd would not read {value!r} back as written")
    return value


def _settings_lines(s: SshdSettings) -> list[tuple[str, str]]:
    """(why, directive) pairs in the order written."""
    principals = _command("AuthorizedPrincipalsCommand", s.principals_command)
    if not PurePosixPath(split_args(principals)[0]).is_absolute():
        raise ConfigError("AuthorizedPrincipalsCommand: sshd requires an absolute path")
    if not _USER_RE.fullmatch(s.principals_user):
        raise ConfigError(
            f"AuthorizedPrincipalsCommandUser: not a user name: {s.principals_user!r}"
        )
    if not PurePosixPath(s.trusted_ca_file).is_absolute():
        raise ConfigError(f"TrustedUserCAKeys: not an absolute path: {s.trusted_ca_file!r}")
    env = ["SHLVL=1"]
    for pair in s.setenv:
        name, sep, _ = pair.partition("=")
        if not sep or not _ENV_NAME_RE.fullmatch(name):
            raise ConfigError(f"SetEnv: not NAME=VALUE: {pair!r}")
        if name != "SHLVL":  # ours must stay: see docs/sshd-setup.md
            env.append(pair)

    def flag(on: bool) -> str:
        return "yes" if on else "no"

    channel = "bypasses the ForceCommand, so it cannot be recorded"
    return [
        (
            "user certificates signed by these CA keys",
            f"TrustedUserCAKeys {_quote('TrustedUserCAKeys', s.trusted_ca_file)}",
        ),
        (
            "maps unix users to principals; logs every attempt",
            f"AuthorizedPrincipalsCommand {principals}",
        ),
        (
            "unprivileged user for the principals command",
            f"AuthorizedPrincipalsCommandUser {s.principals_user}",
        ),
        ("the session learns which key or certificate logged in", "ExposeAuthInfo yes"),
        ("~/.ssh/rc would run before the recorder", "PermitUserRC no"),
        (
            "~/.ssh/environment could set BASH_ENV or LD_PRELOAD for the shell that starts "
            "the recorder",
            "PermitUserEnvironment no",
        ),
        (
            "bash sources ~/.bashrc before the recorder at SHLVL 0 (Debian SSH_SOURCE_BASHRC)",
            "SetEnv " + " ".join(_quote("SetEnv", pair) for pair in env),
        ),
        (
            "every session channel runs the recorder",
            f"ForceCommand {_command('ForceCommand', s.force_command)}",
        ),
        (f"TCP forwarding {channel}", f"AllowTcpForwarding {flag(s.tcp)}"),
        (f"Unix socket forwarding {channel}", f"AllowStreamLocalForwarding {flag(s.streamlocal)}"),
        (f"agent forwarding {channel}", f"AllowAgentForwarding {flag(s.agent)}"),
        (f"X11 forwarding {channel}", f"X11Forwarding {flag(s.x11)}"),
        (f"tunnel device forwarding {channel}", f"PermitTunnel {flag(s.tunnel)}"),
        *_certificate_only(s),
    ]


def _certificate_only(s: SshdSettings) -> list[tuple[str, str]]:
    if not s.certificate_only:
        return []
    why = "certificate-only: short-lived certificates from the CA above are the way in"
    return [
        (why, "AuthorizedKeysFile none"),
        ("certificate-only: no passwords", "PasswordAuthentication no"),
        (
            "certificate-only: no keyboard-interactive (PAM passwords)",
            "KbdInteractiveAuthentication no",
        ),
    ]


def render_settings(s: SshdSettings) -> str:
    """The directives, each after a ``#`` line saying why (docs/sshd-setup.md)."""
    return "".join(f"# {why}\n{directive}\n" for why, directive in _settings_lines(s))


def dropin_text(s: SshdSettings) -> str:
    """The whole content of ``<dropin dir>/00-sshaudit.conf``."""
    return DROPIN_HEADER + render_settings(s)


def find_dropin_dir(main_text: str, sshdir: Path = SSHDIR) -> Path | None:
    """The directory of a top-level ``Include <dir>/*.conf`` in the main config, or None.

    None also when one of our keywords appears at top level *before* that Include: its value
    would beat the drop-in's (first obtained value wins), so the caller must use block mode.
    Relative Include paths are relative to ``sshdir`` (servconf.c prefixes SSHDIR, /etc/ssh, not
    the config file's own directory).
    """
    seen_ours = False
    for directive in iter_directives(main_text):
        if directive.in_match:
            return None
        if directive.keyword in OUR_KEYWORDS:
            seen_ours = True
        if directive.keyword != "include":
            continue
        for pattern in directive.args:
            head, sep, tail = pattern.rpartition("/")
            if sep and tail == "*.conf" and head and not any(c in head for c in "*?["):
                return None if seen_ours else sshdir / head
    return None


def _marker_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of each complete marked block, terminators included."""
    spans: list[tuple[int, int]] = []
    start = -1
    offset = 0
    for line in lines_keepends(text):
        bare = line.rstrip("\r\n")
        if bare == BLOCK_BEGIN:
            if start >= 0:
                raise ConfigError("sshd_config: nested '# BEGIN sshaudit' markers; fix by hand")
            start = offset
        elif bare == BLOCK_END:
            if start < 0:
                raise ConfigError("sshd_config: '# END sshaudit' without its BEGIN; fix by hand")
            spans.append((start, offset + len(line)))
            start = -1
        offset += len(line)
    if start >= 0:
        raise ConfigError("sshd_config: '# BEGIN sshaudit' without its END; fix by hand")
    return spans


def remove_block(text: str) -> str:
    """``text`` without any sshaudit block (the inverse of add_block)."""
    out, last = [], 0
    for start, end in _marker_spans(text):
        out.append(text[last:start])
        last = end
    out.append(text[last:])
    return "".join(out)


def add_block(text: str, settings: SshdSettings) -> str:
    """``text`` with our marked block as its first lines (replacing any earlier block)."""
    block = f"{BLOCK_BEGIN}\n{render_settings(settings)}{BLOCK_END}\n"
    return block + remove_block(text)
