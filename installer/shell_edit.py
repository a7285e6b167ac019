"""The shell start-up edit of ``sshaudit-agent enroll``: hand over to the recorder before any
user file runs. Pure ``str -> str`` functions (add / remove a marked block at the top).

Why: sshd runs the ForceCommand as ``$SHELL -c "<ForceCommand>"`` (sshd_config(5) ForceCommand,
sshd(8) LOGIN PROCESS), and some shells read user files for ``-c`` before they run the
command (issue 9, attack 4): zsh reads ``~/.zshenv`` (zsh(1) STARTUP/SHUTDOWN FILES), tcsh
``~/.tcshrc`` or ``~/.cshrc`` (tcsh(1) Startup and shutdown), fish ``~/.config/fish/config.fish``
and ``~/.config/fish/conf.d/*.fish``. Each reads a system file first: the block at its top
``exec``s the recorder at once when the shell's ``-c`` string is exactly the ForceCommand, so
the recorder starts before the user's files and then starts the user's own shell (a login
shell, or ``$SHELL -c "$SSH_ORIGINAL_COMMAND"``), which reads every file as it would without us.

Invariants:
- The block fires only when the ``-c`` string is exactly the ForceCommand (zsh:
  ``$ZSH_EXECUTION_STRING``; tcsh and fish: ``/proc/<pid>/cmdline`` is ``tcsh -c <ForceCommand>``
  (or ``csh``), ``fish -c <ForceCommand>``; tcsh's own ``command`` variable is set only after
  its start-up files). The
  recorder's own shell gets ``-c "$SSH_ORIGINAL_COMMAND"`` or no ``-c`` at all, so it never
  fires there: no loop, unless the client's command is the ForceCommand itself, which runs the
  recorder again with or without this block.
- ``exec`` keeps the environment (SSH_ORIGINAL_COMMAND, SSH_CONNECTION, ...) and the pid.
- ``remove_hook(add_hook(t, ...)) == t`` byte for byte for every text without our markers;
  ``add_hook`` is idempotent (an earlier block is replaced).
- The ForceCommand's words are plain (letters, digits, ``@%+=:,./_-``): each shell reads them
  back unquoted and identically, and the block needs no quoting rules; anything else is a
  ConfigError.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sshaudit.errors import ConfigError

from .sshd_parse import lines_keepends

BEGIN = "# BEGIN sshaudit recorder handover (managed by sshaudit-agent enroll; do not edit)"
END = "# END sshaudit recorder handover"
_PLAIN = re.compile(r"[A-Za-z0-9@%+=:,./_-]+")


@dataclass(frozen=True)
class StartupFile:
    """A shell's system-wide start-up file, read for ``-c`` before any user file.

    ``relative`` is under /etc (Debian's paths; RHEL's are the same for these three);
    ``own_dir`` is the shell's own directory under /etc (None: /etc itself): the file is edited
    when it exists or when that directory exists."""

    shell: str
    relative: str
    own_dir: str | None


STARTUP_FILES = (
    StartupFile("zsh", "zsh/zshenv", "zsh"),  # zsh(1): /etc/zsh/zshenv on Debian
    StartupFile("tcsh", "csh.cshrc", None),  # tcsh(1): /etc/csh.cshrc (also csh -> tcsh)
    StartupFile("fish", "fish/config.fish", "fish"),  # fish: $__fish_sysconf_dir/config.fish
)


def _zsh(command: str) -> str:
    return (
        '# sshd runs the ForceCommand as `zsh -c "<ForceCommand>"` (sshd_config(5)); zsh reads\n'
        "# this file before ~/.zshenv (zsh(1) STARTUP/SHUTDOWN FILES): start the recorder now.\n"
        f"if [[ ${{ZSH_EXECUTION_STRING-}} == '{command}' ]]; then\n"
        f"  exec {command}\n"
        "fi\n"
    )


def _tcsh(command: str) -> str:
    # tcsh 6.24 sets its "command" variable only after the start-up files, so the -c string
    # comes from /proc (one tr(1), only for non-interactive shells under sshd).
    return (
        '# sshd runs the ForceCommand as `tcsh -c "<ForceCommand>"` (or csh, its basename;\n'
        "# sshd_config(5)); tcsh reads this file before ~/.tcshrc or ~/.cshrc (tcsh(1) Startup\n"
        "# and shutdown): start the recorder now. sshd always sets SSH_CONNECTION; a -c shell\n"
        "# has no prompt.\n"
        "if ( $?SSH_CONNECTION && ! $?prompt ) then\n"
        "  set sshaudit_argv = \"`/usr/bin/tr '\\0' ' ' < /proc/$$/cmdline`\"\n"
        f"  if ( \"$sshaudit_argv\" == 'tcsh -c {command} ' ||"
        f" \"$sshaudit_argv\" == 'csh -c {command} ' ) exec {command}\n"
        "  unset sshaudit_argv\n"
        "endif\n"
    )


def _fish(command: str) -> str:
    return (
        '# sshd runs the ForceCommand as `fish -c "<ForceCommand>"` (sshd_config(5)). fish reads\n'
        "# /usr/share/fish/config.fish, then conf.d snippets (the user's\n"
        "# ~/.config/fish/conf.d/*.fish FIRST), then this file, then ~/.config/fish/config.fish:\n"
        "# this starts the recorder before the user's config.fish, not before their conf.d\n"
        "# snippets (docs/sshd-setup.md).\n"
        "builtin set -l sshaudit_argv (builtin string split0 < /proc/$fish_pid/cmdline)\n"
        # "x" first: test(1) would read a bare -c as an operator
        "if builtin test (builtin count $sshaudit_argv) -eq 3"
        '; and builtin test "x$sshaudit_argv[2]" = x-c'
        f"; and builtin test \"x$sshaudit_argv[3]\" = 'x{command}'\n"
        f"    exec {command}\n"
        "end\n"
    )


_RENDER: dict[str, Callable[[str], str]] = {"zsh": _zsh, "tcsh": _tcsh, "fish": _fish}


def render_hook(shell: str, argv: Sequence[str]) -> str:
    """The marked block for ``shell`` that execs ``argv`` (the ForceCommand's words)."""
    if shell not in _RENDER:
        raise ConfigError(f"no start-up hook for shell {shell!r}")
    if not argv or not all(_PLAIN.fullmatch(word) for word in argv):
        raise ConfigError(
            f"ForceCommand words must be plain for the {shell} hand-over: {list(argv)!r}"
        )
    command = " ".join(argv)
    return f"{BEGIN}\n{_RENDER[shell](command)}{END}\n"


def _spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of each complete marked block, terminators included."""
    spans: list[tuple[int, int]] = []
    start, offset = -1, 0
    for line in lines_keepends(text):
        bare = line.rstrip("\r\n")
        if bare == BEGIN:
            if start >= 0:
                raise ConfigError("shell start-up file: nested sshaudit blocks; fix by hand")
            start = offset
        elif bare == END:
            if start < 0:
                raise ConfigError("shell start-up file: sshaudit END without BEGIN; fix by hand")
            spans.append((start, offset + len(line)))
            start = -1
        offset += len(line)
    if start >= 0:
        raise ConfigError("shell start-up file: sshaudit BEGIN without END; fix by hand")
    return spans


def remove_hook(text: str) -> str:
    """``text`` without any sshaudit hand-over block (the inverse of :func:`add_hook`)."""
    out, last = [], 0
    for start, end in _spans(text):
        out.append(text[last:start])
        last = end
    out.append(text[last:])
    return "".join(out)


def add_hook(text: str, shell: str, argv: Sequence[str]) -> str:
    """``text`` with the hand-over block as its first lines (replacing an earlier block)."""
    return render_hook(shell, argv) + remove_hook(text)
