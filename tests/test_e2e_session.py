"""An interactive session, recorded end to end: ``ssh -tt`` on a real pty (the harness's
PtySession), a real sshd whose ForceCommand is the recorder, the real daemon and PAM hook.

What a user types and sees, resizes of the window and a password typed at ``read -s`` are
checked in the decrypted recording (the auditor's key): the output, the input, the ``"r"``
event with the new size, a marker for the hidden input, and not a trace of the password.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import AgentFactory, agents, only_recording
from sshd_harness import SshdFactory
from sshd_host import UnixUser

from sshaudit.asciicast import Code

pytestmark = pytest.mark.e2e
HIDDEN = "input hidden (echo off): "


@pytest.fixture
def agent(root_work_dir: Path) -> Iterator[AgentFactory]:
    with agents(root_work_dir) as make:
        yield make


def test_interactive_session_is_recorded_and_the_password_is_not(
    agent: AgentFactory, sshd_server: SshdFactory, alice: UnixUser
) -> None:
    password = "Hunter2-" + secrets.token_hex(8)  # unique: never in a recording by chance
    a = agent(frame_interval=0.2)
    server = sshd_server(force_command=a.force_command(), pam_extra=(a.pam_line(),))
    with server.interactive(alice, rows=24, cols=80) as term:
        term.send("echo ready-$((6*7))\r")
        term.read_line("ready-42")
        # bash runs `echo` once readline gave the terminal back (cooked, echo on): from
        # then on what is typed goes to cat through an echoing terminal, recorded as "i"
        term.send("echo go-$((2+2)); cat\r")
        term.read_line("go-4")
        term.send("typed-into-cat\r")
        term.read_line("typed-into-cat")
        term.send("\x04")  # ^D: cat ends
        term.set_size(40, 100)
        term.send("stty size\r")
        term.read_line("40 100")
        # the prompt's echo reads "Pass""word: ", so only the real prompt matches
        term.send('read -s -p "Pass""word: " pw; echo; echo "len=${#pw}"\r')
        term.read_until(b"Password: ")
        time.sleep(0.2)  # bash may print the prompt before it turns echo off
        term.send(password + "\r")
        term.read_line(f"len={len(password)}")
        term.send("exit\r")
        assert term.wait() == 0
        screen = bytes(term.output)
    assert password.encode() not in screen  # the terminal did not echo it either

    rec = only_recording(a)
    r = rec.record
    assert (r["recording_status"], r["program_type"], r["exit_status"]) == ("complete", "shell", 0)
    assert r["details"]["pty"] is True and r["details"]["tty"].startswith("/dev/pts/")
    assert rec.sealed_to_the_end
    assert (rec.header.width, rec.header.height) == (80, 24)
    for seen in ("ready-42", "go-4", "typed-into-cat", "40 100", f"len={len(password)}"):
        assert seen in rec.output, seen
    assert "typed-into-cat" in rec.input
    assert [e.data for e in rec.events if e.code is Code.RESIZE] == ["100x40"]
    hidden = sum(int(m.removeprefix(HIDDEN).split()[0]) for m in rec.markers if HIDDEN in m)
    assert hidden >= len(password) + 1  # the password and its Enter, counted, not shown
    assert r["bytes_in"] >= len(password) + len("typed-into-cat")
    # not a trace: not in the plaintext, not in any stream joined across events, not in
    # the record, not in the daemon's log
    assert password.encode() not in rec.plain
    for code in Code:
        assert password not in rec.text(code)
    assert password not in str(r) and password not in a.log.read_text()


def test_commands_typed_at_the_bash_prompt_are_recorded_as_input(
    agent: AgentFactory, sshd_server: SshdFactory, alice: UnixUser
) -> None:
    a = agent(frame_interval=0.2)
    server = sshd_server(force_command=a.force_command())
    with server.interactive(alice) as term:
        term.send("echo ready-$((6*7))\r")
        term.read_line("ready-42")  # readline now owns the terminal
        term.send("echo typed-at-the-prompt-$((3*3))\r")
        term.read_line("typed-at-the-prompt-9")
        term.send("exit\r")
        assert term.wait() == 0
    rec = only_recording(a)
    assert "typed-at-the-prompt-9" in rec.output
    assert "echo typed-at-the-prompt-$((3*3))" in rec.input
