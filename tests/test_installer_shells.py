"""The shell start-up hand-over (installer/shell_edit.py): golden files, exact inverse,
idempotence, and what the real zsh, tcsh and fish do with the block.

Golden inputs in tests/golden/shells/debian12/ are Debian 12's stock files (zsh-common 5.9:
/etc/zsh/zshenv, tcsh 6.24.07: /etc/csh.cshrc, fish-common 3.6.0: /etc/fish/config.fish),
named ``<shell>-<file>``; ``expected/`` holds what enroll writes. Regenerate after an intended
change with ``SSHAUDIT_REGEN_GOLDEN=1 .venv/bin/pytest tests/test_installer_shells.py`` and
review the git diff: the test then rewrites them and fails, so a regeneration never passes
silently.

The real-shell tests put the block where each shell reads a *user* file for ``-c``
(``$ZDOTDIR/.zshenv``, ``~/.tcshrc``, ``$XDG_CONFIG_HOME/fish/config.fish``), so they need no
change in /etc: the condition and the ``exec`` behave the same in either file. The system files
themselves are exercised end to end by tests/test_attack_startup.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshaudit.errors import ConfigError
from sshaudit.installer.shell_edit import BEGIN, END, STARTUP_FILES, add_hook, remove_hook

GOLDEN = Path(__file__).parent / "golden" / "shells" / "debian12"
REGEN = os.environ.get("SSHAUDIT_REGEN_GOLDEN") == "1"
ARGV = ("/usr/libexec/sshaudit/record", "--config", "/etc/sshaudit/agent.toml")
SHELLS = [f.shell for f in STARTUP_FILES]


def _input(shell: str) -> Path:
    (path,) = GOLDEN.glob(f"{shell}-*")
    return path


@pytest.mark.parametrize("shell", SHELLS)
def test_golden(shell: str) -> None:
    source = _input(shell)
    out = add_hook(source.read_text(), shell, ARGV)
    expected = GOLDEN / "expected" / source.name
    if REGEN:
        expected.parent.mkdir(exist_ok=True)
        expected.write_text(out)
        pytest.fail(f"SSHAUDIT_REGEN_GOLDEN=1: rewrote {expected}; review the diff, rerun")
    assert out == expected.read_text()
    assert out.startswith(BEGIN + "\n") and out.endswith(source.read_text())
    assert remove_hook(out) == source.read_text()  # remove = identity
    assert add_hook(out, shell, ARGV) == out  # idempotent


@pytest.mark.parametrize("shell", SHELLS)
def test_a_new_forcecommand_replaces_the_old_block(shell: str) -> None:
    once = add_hook("x\n", shell, ARGV)
    again = add_hook(once, shell, ("/opt/rec", "--config", "/opt/a.toml"))
    assert again.count(BEGIN) == 1 and "/opt/rec --config /opt/a.toml" in again
    assert remove_hook(again) == "x\n"


@pytest.mark.parametrize(
    "argv", [(), ("/a b/rec",), ("/rec", "--x='y'"), ("/rec", "$(id)"), ("/rec", "a\nb")]
)
def test_words_that_need_quoting_are_refused(argv: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="plain"):
        add_hook("", "zsh", argv)


@pytest.mark.parametrize(
    "text", [f"{BEGIN}\nx\n", f"x\n{END}\n", f"{BEGIN}\n{BEGIN}\n{END}\n{END}\n"]
)
def test_broken_markers_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="fix by hand"):
        remove_hook(text)


_lines = st.lists(
    st.tuples(
        st.sampled_from(["if true; then", "# c", "", "fi", "set x = 1"]) | st.text(max_size=8),
        st.sampled_from(["\n", "\r\n", ""]),
    )
).map(lambda parts: "".join(a + b for a, b in parts))


@settings(max_examples=200)
@given(_lines, st.sampled_from(SHELLS))
def test_exact_inverse(text: str, shell: str) -> None:
    if BEGIN in text or END in text:
        return
    assert remove_hook(add_hook(text, shell, ARGV)) == text


# --- the real shells ------------------------------------------------------------------


RECORDER = """#!/bin/sh
printf 'RECORDER %s|%s|%s\\n' "$*" "${SSH_ORIGINAL_COMMAND-unset}" "${SSH_CONNECTION-unset}"
"""


def _user_file(shell: str, home: Path) -> Path:
    return {
        "zsh": home / ".zshenv",
        "tcsh": home / ".tcshrc",
        "fish": home / ".config" / "fish" / "config.fish",
    }[shell]


def _run(shell: str, home: Path, *argv: str) -> str:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "ZDOTDIR": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "SSH_ORIGINAL_COMMAND": 'echo "it works" $HOME',
        "SSH_CONNECTION": "192.0.2.1 4000 192.0.2.2 22",
    }
    done = subprocess.run(
        [shell, *argv], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_real_shell_hands_over_only_for_the_forcecommand(shell: str, tmp_path: Path) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed (scripts/bootstrap installs it)")
    recorder = tmp_path / "record"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    argv = (str(recorder), "--config", str(tmp_path / "agent.toml"))
    command = " ".join(argv)
    user = _user_file(shell, tmp_path)
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text(add_hook("echo USER-FILE-RAN\n", shell, argv))
    # as sshd runs the ForceCommand: the recorder at once, with the environment, no user file
    env = 'echo "it works" $HOME|192.0.2.1 4000 192.0.2.2 22'
    assert (
        _run(shell, tmp_path, "-c", command) == f"RECORDER --config {tmp_path}/agent.toml|{env}\n"
    )
    # as the recorder runs the user's shell: every file as usual, no second hand-over
    assert _run(shell, tmp_path, "-c", "echo plain") == "USER-FILE-RAN\nplain\n"
    assert _run(shell, tmp_path, "-c", f"{command} --more").startswith("USER-FILE-RAN\nRECORDER")
