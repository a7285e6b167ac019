"""The pam_env edit of ``sshaudit-agent enroll``: no user-controlled environment file in sshd's
PAM service. Pure ``str -> str`` functions, applied by installer/pam_edit.py's add_hook.

Why: pam_env(8) ``user_readenv=1`` makes pam_env read the user's own ``~/.pam_environment``
(or the file ``user_envfile=`` names, relative to the home directory) into the PAM
environment, which sshd gives the session: a user could set ``BASH_ENV`` or ``LD_PRELOAD``
for the ``$SHELL -c "<ForceCommand>"`` that starts the recorder, and so run code before it
(issue 9, attack 1). Debian's stock /etc/pam.d/sshd has
``session required pam_env.so user_readenv=1 envfile=/etc/default/locale``.

Invariants:
- Every ``user_readenv=<v>`` word of a pam_env.so line becomes ``user_readenv=0``; a pam_env.so
  line that names ``user_envfile=`` without any ``user_readenv=`` gets ``user_readenv=0`` after
  its module path (pam_env reads its arguments in order, a later one overriding an earlier).
  Nothing else in the line changes (spacing, other options, its comment, its terminator).
- Every physical line changed is preceded by one comment line ``WAS`` + the line as it was, so
  ``restore_user_env(neutralise_user_env(t)) == t`` byte for byte for every text without
  ``WAS`` lines, and ``neutralise_user_env`` is idempotent.
- Lines are read as Linux-PAM's ``_pam_assemble_line`` (libpam/pam_handlers.c) reads them:
  text from the first ``#`` on is a comment, a line ending in ``\\`` continues on the next
  non-comment line, comment-only lines are skipped (so our comment line never breaks a
  continued line).
"""

from __future__ import annotations

import re

from sshaudit.errors import ConfigError

from .sshd_parse import lines_keepends

WAS = "# sshaudit: enroll set user_readenv=0 (pam_env(8)); the line was: "
_READENV = re.compile(r"(^|[ \t])user_readenv=[^ \t\\\r\n]*")
_SAFE = "user_readenv=0"


def _code(line: str) -> str:
    """The part of a physical line PAM reads (before the first ``#``)."""
    return line.split("#", 1)[0]


def _is_content(line: str) -> bool:
    body = line.lstrip(" \n\t")
    return bool(body) and not body.startswith("#")


def _continues(line: str) -> bool:
    return "#" not in line and line.rstrip(" \t\r\n").endswith("\\")


def _logical_lines(lines: list[str]) -> list[list[int]]:
    """Indexes of the physical lines of each logical PAM line (comment lines skipped)."""
    groups: list[list[int]] = []
    current: list[int] = []
    for index, line in enumerate(lines):
        if not _is_content(line):
            continue
        current.append(index)
        if not _continues(line):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _module_word(words: list[str]) -> int | None:
    """Index of the module path in ``type control module args...`` (control may be
    ``[value=action ...]`` over several words), None when there is none."""
    index = 1
    if len(words) > 1 and words[1].startswith("["):
        while index < len(words) and not words[index].endswith("]"):
            index += 1
    return index + 1 if index + 1 < len(words) else None


def _words(code: str) -> list[str]:
    return code.replace("\\", " ").split()


def _rewrite(lines: list[str], group: list[int]) -> dict[int, str]:
    """New text of the physical lines of one logical line that must change."""
    words = _words(" ".join(_code(lines[i]) for i in group))
    module = _module_word(words)
    if module is None or words[module].rpartition("/")[2] != "pam_env.so":
        return {}
    args = words[module + 1 :]
    has_readenv = any(a.startswith("user_readenv=") for a in args)
    if not has_readenv and not any(a.startswith("user_envfile=") for a in args):
        return {}
    out: dict[int, str] = {}
    for i in group:
        code, rest = _code(lines[i]), lines[i][len(_code(lines[i])) :]
        new = _READENV.sub(lambda m: m.group(1) + _SAFE, code)
        if not has_readenv and words[module] in _words(code):
            # after the module path's first occurrence on this line
            path = rf"(^|[ \t]){re.escape(words[module])}(?=[ \t\\\r\n]|$)"
            new = re.sub(path, lambda m: f"{m.group(0)} {_SAFE}", new, count=1)
            has_readenv = True
        if new != code:
            out[i] = new + rest
    return out


def neutralise_user_env(text: str) -> str:
    """``text`` with no pam_env.so line reading a user's environment file (module docstring);
    an earlier edit of ours is undone first, so the result is the same however often run."""
    lines = lines_keepends(restore_user_env(text))
    changed: dict[int, str] = {}
    for group in _logical_lines(lines):
        changed.update(_rewrite(lines, group))
    out: list[str] = []
    for index, line in enumerate(lines):
        if index in changed:
            out.append(WAS + line.rstrip("\n") + "\n")
            out.append(changed[index])
        else:
            out.append(line)
    return "".join(out)


def restore_user_env(text: str) -> str:
    """``text`` with every line we rewrote put back as it was (the inverse of
    :func:`neutralise_user_env`)."""
    lines = lines_keepends(text)
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.startswith(WAS):
            out.append(line)
            index += 1
            continue
        if index + 1 >= len(lines):
            raise ConfigError("PAM file: sshaudit pam_env comment without its line; fix by hand")
        original = line[len(WAS) :].removesuffix("\n")
        ending = "\n" if lines[index + 1].endswith("\n") else ""
        out.append(original + ending)
        index += 2
    return "".join(out)
