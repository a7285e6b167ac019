"""The launcher sshd's ForceCommand points at (agent/launcher.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import sshaudit
from sshaudit.agent.launcher import render, write_launcher
from sshaudit.errors import SSHAuditError, UsageError

PACKAGE_PARENT = str(Path(sshaudit.__file__).parent.parent)


def test_written_atomically_root_owned_0755_and_runs(tmp_path: Path) -> None:
    path = tmp_path / "record"
    path.write_text("old content")
    write_launcher(str(path), sys.executable, PACKAGE_PARENT)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, 0)
    text = path.read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n")
    assert f"sys.path.insert(0, {PACKAGE_PARENT!r})" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record"]  # no temporary left
    done = subprocess.run(
        [str(path), "--help"],
        capture_output=True,
        timeout=30,
        env={"PYTHONPATH": "/nonexistent", "PYTHONSTARTUP": "/etc/passwd"},
    )
    assert done.returncode == 0 and done.stdout.startswith(b"NAME\n"), done.stderr


def test_interpreter_runs_isolated(tmp_path: Path) -> None:
    """-IS: no user site, no PYTHON* variables, no script dir on sys.path (a user cannot
    plant a module next to the launcher or in their environment)."""
    path = tmp_path / "record"
    write_launcher(str(path), sys.executable, PACKAGE_PARENT)
    probe = tmp_path / "probe"
    probe.write_text(
        path.read_text().replace(
            "from sshaudit.agent.record import main\n\nraise SystemExit(main())\n",
            "print(sys.flags.isolated, sys.flags.no_site, sys.path[0])\n",
        )
    )
    probe.chmod(0o755)
    out = subprocess.run([str(probe)], capture_output=True, timeout=30, check=True).stdout
    assert out.split() == [b"1", b"1", PACKAGE_PARENT.encode()]


@pytest.mark.parametrize(
    ("python", "parent"),
    [
        ("python3", "/opt/x"),
        ("/usr/bin/python3", "relative/dir"),
        ("/usr/bin/py thon3", "/opt/x"),
        ("/usr/bin/python3", "/opt/x\nimport os"),
        ("/usr/bin/python3\n", "/opt/x"),
        ("/" + "p" * 300, "/opt/x"),
    ],
)
def test_unsafe_paths_are_refused(python: str, parent: str) -> None:
    with pytest.raises(UsageError):
        render(python, parent)


def test_quotes_in_the_package_path_stay_a_literal(tmp_path: Path) -> None:
    odd = tmp_path / 'it\'s "odd"'
    odd.mkdir()
    text = render(sys.executable, str(odd))
    compile(text, "launcher", "exec")  # still valid Python
    assert f"sys.path.insert(0, {str(odd)!r})" in text


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SSHAuditError, match="cannot write"):
        write_launcher(str(tmp_path / "missing" / "record"), sys.executable, PACKAGE_PARENT)
