"""Writes the launchers sshd runs: the tiny scripts its ForceCommand (the recorder) and its
AuthorizedPrincipalsCommand (the principals command) point at.

    #!<python> -IS
    import sys
    sys.path.insert(0, '<dir holding the sshaudit package>')
    from sshaudit.agent.record import main
    raise SystemExit(main())

Why this shape: ``-I`` (isolated: no PYTHON* variables, no user site, no script dir on
sys.path) and ``-S`` (no site: no .pth files, no venv scan) keep the recorded user from
steering the interpreter and keep start-up to the bare interpreter plus what the recorder
imports (DESIGN.md "Performance facts"). The two flags are one word because Linux passes
everything after the interpreter path in a ``#!`` line as a single argument (execve(2)).

Invariants: the file is written atomically (a temporary file in the same directory, fsync,
os.replace), mode 0755, owned by root when written by root; paths that could break the
``#!`` line or the Python literal (relative, newline, NUL) are refused.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath

from sshaudit.errors import SSHAuditError, UsageError

TEMPLATE = """\
#!{python} -IS
# sshaudit {role} launcher (written by sshaudit; do not edit).
import sys

sys.path.insert(0, {package_parent!r})
from {module} import main

raise SystemExit(main())
"""
_SHEBANG_MAX = 255  # BINPRM_BUF_SIZE - 1 on Linux 5.1+: a longer #! line is cut


RECORDER = "sshaudit.agent.record"
# The launchers sshd runs (sshd_config(5) ForceCommand, AuthorizedPrincipalsCommand).
ROLES = {RECORDER: "recorder (ForceCommand)", "sshaudit.agent.principals": "principals command"}


def render(python: str, package_parent: str, module: str = RECORDER) -> str:
    if module not in ROLES:
        raise UsageError(f"launcher: unknown module {module!r}")
    for what, value in (("python", python), ("package_parent", package_parent)):
        if not PurePosixPath(value).is_absolute():
            raise UsageError(f"launcher: {what} must be an absolute path: {value!r}")
        if any(c in value for c in "\n\r\0"):
            raise UsageError(f"launcher: {what} contains a newline or NUL")
    if " " in python or "\t" in python or len(python) + 5 > _SHEBANG_MAX:
        raise UsageError(f"launcher: unusable interpreter path for a #! line: {python!r}")
    return TEMPLATE.format(
        python=python, package_parent=package_parent, module=module, role=ROLES[module]
    )


def write_launcher(path: str, python: str, package_parent: str, module: str = RECORDER) -> None:
    """Write the launcher at ``path`` (0755; root-owned when run as root), atomically."""
    text = render(python, package_parent, module).encode("utf-8")
    directory = str(Path(path).absolute().parent)
    try:
        _write_atomically(path, directory, text)
    except OSError as exc:
        raise SSHAuditError(f"launcher: cannot write {path}: {exc.strerror or exc}") from exc


def _write_atomically(path: str, directory: str, text: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".launcher-", dir=directory)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o755)
        view = memoryview(text)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink()
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable
    finally:
        os.close(dir_fd)
