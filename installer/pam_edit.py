"""The PAM edit of ``sshaudit-agent enroll``: the hook lines in sshd's PAM file and no user
environment file for pam_env, pure functions.

Invariants:
- Each inserted line follows its own marker line (``MARKER``); ``remove_hook(add_hook(t, ...))
  == t`` byte for byte for every text without the marker, and ``add_hook`` is idempotent.
- The session hook runs before every module of the session stack that could change the PAM
  environment (pam_env.so, above all ``user_readenv=1``, which reads the user's own
  ``~/.pam_environment`` and could overwrite SSH_AUTH_INFO_0; docs/sshd-setup.md). So it goes
  before the first line that can add a module to that stack: a ``session``/``-session`` line
  (``session include|substack X`` too) or an ``@include X`` (Debian's ``@include`` pulls in every
  type of X, and we cannot see X). Linux-PAM expands include/substack/@include in place, so the
  included modules run after us: there is no stack shape we cannot go first in, hence no
  refusal for includes. The one exception to "first": leading ``session ... pam_selinux.so
  close`` lines stay first (their own comment: "SELinux needs to be the first session rule";
  at close_session it resets the exec context, which our exec must not inherit; at
  open_session ``close`` does nothing, so the environment is untouched before us).
- What runs before us anyway cannot forge the identity: pam_env in the *auth* stack runs at
  pam_setcred, but sshd sets SSH_AUTH_INFO_0 again right before pam_open_session (OpenSSH
  auth-pam.c do_pam_session -> expose_authinfo), and before pam_acct_mgmt (do_pam_account).
- No line of the stack is ever placed between a ``[...=N]`` jump and its target: nothing of
  the same type precedes our line in this file, except pam_selinux close lines without jumps.
- The account hook goes first in the account stack by the same rule.
- If the file has no line at all for the type, the hook is appended at the end.
- No pam_env.so line reads a user's environment file: ``user_readenv=1`` becomes
  ``user_readenv=0`` (installer/pam_env_edit.py, which keeps the old line in a comment so that
  ``remove_hook`` puts it back byte for byte).
- Refused (ConfigError): a hook line with a newline or of the wrong type, a stray marker.
"""

from __future__ import annotations

import re

from sshaudit.errors import ConfigError

from .pam_env_edit import neutralise_user_env, restore_user_env
from .sshd_parse import lines_keepends

MARKER = "# sshaudit: managed by sshaudit-agent enroll"
_JUMP = re.compile(r"=\s*\d")


def _words(line: str) -> list[str]:
    body = line.strip()
    return [] if not body or body.startswith("#") else body.split()


def _type_of(words: list[str]) -> str:
    return words[0].lstrip("-").lower() if words else ""


def _is_selinux_close(words: list[str]) -> bool:
    """``session <control> pam_selinux.so close`` without a jump in its control."""
    if _type_of(words) != "session" or len(words) < 3:
        return False
    index = 1
    if words[1].startswith("["):  # "[value=action ...]" may span several words
        while index < len(words) and not words[index].endswith("]"):
            index += 1
    control = " ".join(words[1 : index + 1])
    rest = words[index + 1 :]
    return (
        bool(rest)
        and rest[0].endswith("pam_selinux.so")
        and "close" in rest[1:]
        and not _JUMP.search(control)
    )


def _insert_index(lines: list[str], kind: str) -> int | None:
    """Index of the line our ``kind`` hook goes before; None to append."""
    continued = False
    for index, line in enumerate(lines):
        was_continued, continued = continued, line.rstrip("\r\n").endswith("\\")
        if was_continued:  # the middle of a "\"-continued line (Linux-PAM joins them)
            continue
        words = _words(line)
        if not words:
            continue
        if words[0].lower() == "@include" or _type_of(words) == kind:
            if kind == "session" and _is_selinux_close(words):
                continue  # only ever reached while no other session line came first
            return index
    return None


def _check_line(kind: str, line: str) -> None:
    if re.search(r"[\x00-\x1f\x7f]", line):
        raise ConfigError(f"PAM {kind} hook: control characters in {line!r}")
    if _type_of(_words(line)) != kind or len(_words(line)) < 3:
        raise ConfigError(f"PAM {kind} hook: not a '{kind} <control> <module>' line: {line!r}")


def remove_hook(text: str) -> str:
    """``text`` without our marked lines and with pam_env lines as they were (the inverse of
    add_hook)."""
    lines = lines_keepends(restore_user_env(text))
    out: list[str] = []
    index = 0
    while index < len(lines):
        if lines[index].rstrip("\r\n") != MARKER:
            out.append(lines[index])
            index += 1
            continue
        if index + 1 >= len(lines):
            raise ConfigError("PAM file: sshaudit marker without its hook line; fix by hand")
        if not lines[index + 1].endswith("\n") and out:
            # appended to a file without a final newline: drop the newline we added before it
            out[-1] = out[-1][:-1]
        index += 2
    return "".join(out)


def _insert(text: str, kind: str, hook: str) -> str:
    lines = lines_keepends(text)
    where = _insert_index(lines, kind)
    pair = f"{MARKER}\n{hook}\n"
    if where is not None:
        return "".join(lines[:where]) + pair + "".join(lines[where:])
    if text and not text.endswith("\n"):
        return f"{text}\n{pair[:-1]}"  # keep the file's "no newline at end"
    return text + pair


def add_hook(text: str, session_line: str, account_line: str) -> str:
    """``text`` with the account hook first in the account stack and the session hook first in
    the session stack (see the module docstring), replacing an earlier hook."""
    _check_line("session", session_line)
    _check_line("account", account_line)
    base = remove_hook(text)
    hooked = _insert(_insert(base, "account", account_line), "session", session_line)
    return neutralise_user_env(hooked)
