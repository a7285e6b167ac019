"""Enrollment's sshd side: which files change and how (installer/, pure edits), applied as
one transaction, validated with ``sshd -t``, undone exactly by unenroll.

Invariants:
- the edits are computed from the files as they are now, by the pure functions of
  installer/ (golden-tested); this module only reads, decides and applies;
- a conflict (installer/sshd_check.py) stops enrollment before any file changes, with every
  offending line named;
- after the files change, ``sshd -t`` must accept them, else every file is rolled back and
  sshd's complaint is the error;
- the launchers sshd runs (recorder, principals command) are root-owned 0755 in a
  root-owned directory: sshd refuses an AuthorizedPrincipalsCommand otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sshaudit
from sshaudit.agent import enroll_proc
from sshaudit.agent.launcher import write_launcher
from sshaudit.agent.layout import Layout
from sshaudit.errors import ConfigError
from sshaudit.installer import files, pam_edit, shell_edit, sshd_check
from sshaudit.installer.sshd_edit import (
    DROPIN_NAME,
    SshdSettings,
    add_block,
    dropin_text,
    find_dropin_dir,
    remove_block,
)
from sshaudit.pam_module import hook

PRINCIPALS_MODULE = "sshaudit.agent.principals"
# sshd_config(5) TOKENS. Not %C: OpenSSH 9.2 does not expand it for this command and drops
# the connection ("percent_expand: unknown key %C", checked here); the daemon reads the
# client's address from the sshd monitor process instead (agent/daemon_auth.py).
PRINCIPAL_TOKENS = "%u %t %k %i %s %f"


@dataclass(frozen=True)
class SshdTarget:
    config: Path  # sshd_config
    pam_file: Path  # /etc/pam.d/sshd (or a private sshd's own service)
    binary: Path  # for sshd -t
    # Where the shells' system start-up files live (/etc; installer/shell_edit.py); None: leave
    # them alone (a private test sshd whose users' shells are not ours to change).
    shell_etc: Path | None = None


@dataclass(frozen=True)
class Plan:
    changes: tuple[files.FileChange, ...]
    diff: str
    notes: tuple[str, ...]


def _flag(policy: Mapping[str, Any], name: str) -> bool:
    forwarding = policy.get("forwarding", {})
    return isinstance(forwarding, dict) and forwarding.get(name) is True


def recorder_argv(layout: Layout) -> tuple[str, ...]:
    """The ForceCommand's words: the recorder launcher (agent/launcher.py) and its config."""
    return (str(layout.recorder), "--config", str(layout.config))


def settings_for(
    layout: Layout, principals_user: str, policy: Mapping[str, Any], setenv: tuple[str, ...]
) -> SshdSettings:
    principals = (
        f"{layout.principals} --policy {layout.policy} --socket {layout.socket} " + PRINCIPAL_TOKENS
    )
    return SshdSettings(
        force_command=" ".join(recorder_argv(layout)),
        trusted_ca_file=str(layout.ca_keys),
        principals_command=principals,
        principals_user=principals_user,
        tcp=_flag(policy, "tcp"),
        agent=_flag(policy, "agent"),
        x11=_flag(policy, "x11"),
        tunnel=_flag(policy, "tunnel"),
        streamlocal=_flag(policy, "streamlocal"),
        setenv=setenv,
        certificate_only=policy.get("certificate_only", True) is not False,
    )


def pam_lines(layout: Layout) -> tuple[str, str]:
    """(session line, account line) for pam_exec(8): ``optional``, so a hook failure never
    blocks a login (the recorder's policy decides that), ``quiet`` to keep PAM's output."""
    run = f"pam_exec.so quiet {sys.executable} -I -S {hook.__file__} "
    args = f"--socket {layout.socket} --spool-dir {layout.spool}"
    return f"session optional {run}{args}", f"account optional {run}{args}"


def _read(path: Path) -> str:
    text = files.read_text(path)
    if text is None:
        raise ConfigError(f"{path} does not exist")
    return text


def plan(
    target: SshdTarget, layout: Layout, principals_user: str, policy: Mapping[str, Any]
) -> Plan:
    main = _read(target.config)
    dropin_dir = find_dropin_dir(main)
    # Our own block (a re-enroll) is not a conflict: review the file as it was before us.
    texts = {str(target.config): remove_block(main)}
    first: list[str] = []
    if dropin_dir is not None and dropin_dir.is_dir():
        for conf in sorted(dropin_dir.glob("*.conf")):
            if conf.name != DROPIN_NAME:
                texts[str(conf)] = _read(conf)
                if sshd_check.sorts_before_ours(conf.name):
                    first.append(str(conf))
    settings = settings_for(
        layout, principals_user, policy, tuple(sshd_check.existing_setenv(texts))
    )
    found = sshd_check.review(texts, settings, first)
    if found.conflicts:
        lines = "\n  ".join(str(c) for c in found.conflicts)
        raise ConfigError(f"sshd's configuration conflicts with recording:\n  {lines}")
    notes = [str(n) for n in found.notes]
    for ca in sshd_check.existing_ca_files(texts):
        notes.append(
            f"TrustedUserCAKeys {ca} is overridden by sshaudit's CA keys file: add its keys "
            "at the collector (sshaudit-collector ca add) to keep trusting them"
        )
    changes = []
    if dropin_dir is not None and dropin_dir.is_dir():
        changes.append(files.FileChange(dropin_dir / DROPIN_NAME, dropin_text(settings), 0o644))
    else:
        mode = target.config.stat().st_mode & 0o7777
        changes.append(files.FileChange(target.config, add_block(main, settings), mode))
    pam = _read(target.pam_file)
    session, account = pam_lines(layout)
    pam_mode = target.pam_file.stat().st_mode & 0o7777
    changes.append(
        files.FileChange(target.pam_file, pam_edit.add_hook(pam, session, account), pam_mode)
    )
    changes.extend(shell_changes(target.shell_etc, layout))
    todo = tuple(c for c in changes if files.read_text(c.path) != c.new_text)
    return Plan(todo, files.unified_diff(todo), tuple(notes))


def shell_changes(etc: Path | None, layout: Layout) -> list[files.FileChange]:
    """The hand-over block (installer/shell_edit.py) at the top of each installed shell's
    system start-up file under ``etc``: a shell counts as installed when its file exists or
    its own directory does (zsh: etc/zsh, fish: etc/fish)."""
    if etc is None:
        return []
    argv = recorder_argv(layout)
    out = []
    for startup in shell_edit.STARTUP_FILES:
        path = etc / startup.relative
        own = startup.own_dir is not None and (etc / startup.own_dir).is_dir()
        if not (path.is_file() or own):
            continue
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
        text = shell_edit.add_hook(files.read_text(path) or "", startup.shell, argv)
        out.append(files.FileChange(path, text, mode))
    return out


def apply(
    target: SshdTarget,
    layout: Layout,
    principals_user: str,
    policy: Mapping[str, Any],
    say: Callable[[str], None],
) -> bool:
    """Make the changes (False: nothing to change); rolled back unless sshd -t accepts."""
    p = plan(target, layout, principals_user, policy)
    for note in p.notes:
        say(f"note: {note}")
    if not p.changes:
        return False
    applied = files.apply(p.changes, layout.backups)
    try:
        problem = enroll_proc.sshd_check(target.binary, target.config)
        if problem is not None:
            raise ConfigError(f"sshd -t refused the edited configuration:\n{problem}")
    except BaseException:
        files.rollback(applied)
        raise
    for path in applied.edited_since:
        say(f"warning: {path} was edited since the last enroll; unenroll restores the original")
    for change in p.changes:
        say(f"changed {change.path}")
    return True


def restore(target: SshdTarget, layout: Layout, *, force: bool = False) -> list[Path]:
    restored = files.restore_all(layout.backups, force=force)
    problem = enroll_proc.sshd_check(target.binary, target.config)
    if problem is not None:
        raise ConfigError(f"after restoring, sshd -t says:\n{problem}")
    return restored


def write_launchers(layout: Layout) -> None:
    """The recorder and principals launchers (agent/launcher.py) for this interpreter."""
    layout.libexec.mkdir(parents=True, exist_ok=True, mode=0o755)
    parent = str(Path(sshaudit.__file__).parent.parent)
    write_launcher(str(layout.recorder), sys.executable, parent)
    write_launcher(str(layout.principals), sys.executable, parent, PRINCIPALS_MODULE)


def created_files(layout: Layout) -> list[Path]:
    """Files enroll (or the daemon for it) created, removed by unenroll."""
    return [
        layout.config,
        layout.host_key,
        layout.credential,
        layout.ca_keys,
        layout.policy,
        layout.policy.parent / "refresh.json",
        layout.recorder,
        layout.principals,
        layout.enrollment,
        layout.daemon_pid,
    ]
