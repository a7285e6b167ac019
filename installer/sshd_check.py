"""Refuse or merge what an existing sshd configuration says about the settings we make.

Invariants:
- Pure: input is ``{file name: text}`` for the main config and every drop-in (ours excluded).
- A *Conflict* is something that would defeat recording or identity (enroll refuses);
  a *Note* is something enroll can proceed with but must tell the admin about.
- Match blocks override global values (sshd_config(5) "Match"), so any Match that sets one of
  our identity keywords or weakens a recording setting is a Conflict.
- A file named in ``first`` (drop-ins that sort before ``00-sshaudit.conf``) is read before
  ours: any top-level value it gives one of our keywords wins, so that is a Conflict too.
- Patterns are matched like OpenSSH match.c ``match_pattern`` (``*`` and ``?`` only).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

from .sshd_edit import DROPIN_NAME, OUR_KEYWORDS, SshdSettings
from .sshd_parse import ConfigLine, iter_directives, match_pattern

# Variables a client must not set (AcceptEnv, ~/.ssh/environment): they make the
# ``$SHELL -c "<ForceCommand>"`` that starts the recorder, or the programs it runs, execute
# user code first. bash sources $BASH_ENV (bash(1) INVOCATION), sh $ENV, bash runs $PS4
# substitutions under SHELLOPTS=xtrace and imports BASH_FUNC_* functions; ld.so(8) loads
# LD_PRELOAD / LD_LIBRARY_PATH / LD_AUDIT; python(1) reads PYTHONSTARTUP, PYTHONPATH, ...
_DANGEROUS_NAMES = ("BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4")
_DANGEROUS_PREFIXES = ("LD_", "PYTHON", "BASH_FUNC_")
_IDENTITY = {
    "forcecommand": "ForceCommand",
    "trustedusercakeys": "TrustedUserCAKeys",
    "authorizedprincipalscommand": "AuthorizedPrincipalsCommand",
    "authorizedprincipalscommanduser": "AuthorizedPrincipalsCommandUser",
    "authorizedprincipalsfile": "AuthorizedPrincipalsFile",
    "setenv": "SetEnv",
}
_NO_PAM = "without UsePAM yes the sshaudit PAM hook never runs; set UsePAM yes"
# keyword -> (settings attribute, values that enable the channel)
_FORWARDING = {
    "allowtcpforwarding": ("tcp", {"yes", "all", "local", "remote"}),
    "allowstreamlocalforwarding": ("streamlocal", {"yes", "all", "local", "remote"}),
    "allowagentforwarding": ("agent", {"yes"}),
    "x11forwarding": ("x11", {"yes"}),
    "permittunnel": ("tunnel", {"yes", "point-to-point", "ethernet"}),
}


@dataclass(frozen=True)
class _Finding:
    file: str
    line_no: int
    line: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line_no}: {self.message}\n    {self.line.strip()}"


@dataclass(frozen=True)
class Conflict(_Finding):
    """A line that stops enroll; ``message`` says why and what to do."""


@dataclass(frozen=True)
class Note(_Finding):
    """A line enroll works with (merges or overrides); shown to the admin."""


@dataclass(frozen=True)
class Review:
    conflicts: tuple[Conflict, ...]
    notes: tuple[Note, ...]


def sorts_before_ours(dropin_file_name: str) -> bool:
    """True for a drop-in that sshd reads before ours (glob(3) sorts names)."""
    return dropin_file_name < DROPIN_NAME


def _is_none(d: ConfigLine) -> bool:
    return len(d.args) == 1 and d.args[0].lower() == "none"


def _matches_some_with_prefix(pattern: str, prefix: str) -> bool:
    """Does the match.c ``pattern`` match at least one name starting with ``prefix``? Walk the
    prefix: a ``*`` may swallow the rest of it, and whatever the pattern still holds then can
    always be matched by some suffix."""
    for index, char in enumerate(prefix):
        if index >= len(pattern):
            return False
        if pattern[index] == "*":
            return True
        if pattern[index] not in ("?", char):
            return False
    return True


def _env_patterns_hit(patterns: tuple[str, ...]) -> list[str]:
    """The dangerous names (``LD_*`` for a prefix) that some pattern would let through."""
    names = [v for v in _DANGEROUS_NAMES if any(match_pattern(v, p) for p in patterns)]
    families = [
        f"{f}*"
        for f in _DANGEROUS_PREFIXES
        if any(_matches_some_with_prefix(p, f) for p in patterns)
    ]
    return names + families


def _anywhere_conflict(d: ConfigLine) -> str | None:
    """In or out of Match: AcceptEnv that lets the client set a dangerous variable (sshd_config(5)
    AcceptEnv: patterns with ``*`` and ``?``), and ChrootDirectory (the recorder is not inside
    the chroot). PermitUserEnvironment is ours (enroll sets ``no``, first); sshd refuses it
    inside a Match block ("not allowed within a Match block", OpenSSH 9.2 sshd -t)."""
    if d.keyword == "acceptenv":
        hit = _env_patterns_hit(d.args)
        if hit:
            return (
                f"AcceptEnv lets the client set {', '.join(hit)}: user code would run before "
                "the recorder (docs/sshd-setup.md); remove that pattern"
            )
    if d.keyword == "chrootdirectory" and not _is_none(d):
        return (
            "ChrootDirectory: the recorder (ForceCommand) cannot run inside the chroot, so these "
            "users' sessions would fail (docs/sshd-setup.md); remove it or exclude these users"
        )
    return None


def _match_conflict(d: ConfigLine, settings: SshdSettings | None) -> str | None:
    """A Match block value that overrides one of ours."""
    value = d.args[0].lower() if d.args else ""
    if d.keyword in _IDENTITY and not (d.keyword == "authorizedprincipalsfile" and _is_none(d)):
        return (
            f"{_IDENTITY[d.keyword]} inside a Match block overrides sshaudit's setting for the "
            "matching connections; move it out of the Match block or remove it"
        )
    if d.keyword == "exposeauthinfo" and value == "no":
        return "ExposeAuthInfo no inside a Match block hides the login identity from the recorder"
    if d.keyword == "permituserrc" and value == "yes":
        return "PermitUserRC yes inside a Match block runs ~/.ssh/rc before the recorder"
    if d.keyword in _FORWARDING:
        attribute, enabling = _FORWARDING[d.keyword]
        allowed = settings is not None and bool(getattr(settings, attribute))
        if value in enabling and not allowed:
            return (
                f"{d.line.split()[0]} inside a Match block enables forwarding that cannot be "
                "recorded; remove it, or allow it in the sshaudit policy"
            )
    return None


def _top_level(d: ConfigLine, first: bool) -> tuple[str | None, str | None]:
    """(conflict, note) messages for a global directive."""
    if first and d.keyword in OUR_KEYWORDS:
        return (f"read before {DROPIN_NAME}, so this value beats sshaudit's; remove it", None)
    if d.keyword == "forcecommand":
        return (
            "an existing ForceCommand would be silently replaced by the recorder; remove it "
            "(users' commands still run, through the recorder)",
            None,
        )
    if d.keyword == "authorizedprincipalscommand" and not _is_none(d):
        return (
            "an existing AuthorizedPrincipalsCommand would be replaced by sshaudit's; remove it, "
            "or express its mapping in the sshaudit policy",
            None,
        )
    if d.keyword in ("trustedusercakeys", "authorizedprincipalsfile") and _is_none(d):
        return (None, None)
    if d.keyword == "trustedusercakeys":
        return (
            None,
            f"existing TrustedUserCAKeys {d.args[0]}: its keys are merged into sshaudit's CA file",
        )
    if d.keyword == "authorizedprincipalsfile":
        return (
            None,
            "AuthorizedPrincipalsFile stays in effect beside sshaudit's principals command: "
            "principals it lists are still accepted",
        )
    if d.keyword == "setenv":
        return (None, "SetEnv: the first such line's values are merged into sshaudit's SetEnv line")
    if d.keyword in OUR_KEYWORDS:
        return (None, "overridden by sshaudit's value (sshd uses the first value it reads)")
    return (None, None)


def _directives(texts: Mapping[str, str]) -> Iterator[tuple[str, ConfigLine]]:
    for name, text in texts.items():
        for directive in iter_directives(text):
            yield name, directive


def review(
    texts: Mapping[str, str],
    settings: SshdSettings | None = None,
    first: Collection[str] = (),
) -> Review:
    """Conflicts and notes for the main config and drop-ins in ``texts`` (ours excluded).

    ``settings`` (when given) lets a Match block enable a forwarding the policy allows anyway;
    ``first`` names the files whose top-level values sshd reads before ours.
    """
    conflicts: list[Conflict] = []
    notes: list[Note] = []
    for name, d in _directives(texts):
        conflict = _anywhere_conflict(d)
        note = None
        if conflict is None and d.in_match:
            conflict = _match_conflict(d, settings)
        elif conflict is None:
            conflict, note = _top_level(d, name in first)
        if conflict is not None:
            conflicts.append(Conflict(name, d.line_no, d.line, conflict))
        if note is not None:
            notes.append(Note(name, d.line_no, d.line, note))
    conflicts.extend(_pam_conflicts(texts))
    return Review(tuple(conflicts), tuple(notes))


def _pam_conflicts(texts: Mapping[str, str]) -> list[Conflict]:
    """sshd's default is ``UsePAM no`` (sshd_config(5)); without PAM the session hook never
    runs. Conservative: every ``UsePAM no`` conflicts, and so does the absence of ``yes``."""
    found: list[Conflict] = []
    enabled = False
    for name, d in _directives(texts):
        if d.keyword == "usepam" and d.args:
            if d.args[0].lower() == "no":
                found.append(Conflict(name, d.line_no, d.line, _NO_PAM))
            enabled = enabled or d.args[0].lower() == "yes"
    if not enabled and not found:
        name = next(iter(texts), "sshd_config")
        found.append(Conflict(name, 0, "", "UsePAM is not set (default no): " + _NO_PAM))
    return found


def check_conflicts(
    texts: Mapping[str, str],
    settings: SshdSettings | None = None,
    first: Collection[str] = (),
) -> list[Conflict]:
    """The Conflicts of :func:`review`."""
    return list(review(texts, settings, first).conflicts)


def existing_ca_files(texts: Mapping[str, str]) -> list[str]:
    """Files named by top-level ``TrustedUserCAKeys`` lines (whose keys enroll merges)."""
    found: list[str] = []
    for _, d in _directives(texts):
        top = d.keyword == "trustedusercakeys" and not d.in_match and not _is_none(d)
        if top and d.args and d.args[0] not in found:
            found.append(d.args[0])
    return found


def existing_setenv(texts: Mapping[str, str]) -> list[str]:
    """``NAME=VALUE`` pairs of the first top-level ``SetEnv`` line (``texts`` in sshd's reading
    order), for SshdSettings.setenv: servconf.c keeps only the first SetEnv line it reads."""
    for _, d in _directives(texts):
        if d.keyword == "setenv" and not d.in_match:
            return list(d.args)
    return []
