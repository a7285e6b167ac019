"""The daemon end to end: a real OpenSSH sshd (tests/sshd_harness.py) whose ForceCommand is
the real recorder, the real daemon (``sshaudit-agent daemon``, with the production peer check
against sshd's own process tree) and the PAM hook in the test sshd's PAM stack."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import Agent, wait_records
from daemon_helpers import decrypt
from sshd_harness import SshdServer
from sshd_host import UnixUser

import sshaudit
from sshaudit.asciicast import Code, decode_all
from sshaudit.sealed import Completeness, SignatureStatus

pytestmark = pytest.mark.e2e
PY = sys.executable
AGENT = str(Path(PY).parent / "sshaudit-agent")
PACKAGE_PARENT = str(Path(sshaudit.__file__).parent.parent)  # the link tree: not resolved


@pytest.fixture
def agent(root_work_dir: Path) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(**policy: Any) -> Agent:
        a = Agent(root_work_dir, **policy).start()
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop()
        print(a.log.read_text()[-4000:])


def test_exec_session_is_recorded_and_linked_to_its_pam_session(
    agent: Callable[..., Agent], sshd_server: Callable[..., SshdServer], alice: UnixUser
) -> None:
    a = agent(reconcile_grace=2.0)
    server = sshd_server(force_command=a.force_command(), pam_extra=(a.pam_line(),))
    r = server.ssh(alice, "echo hello; echo oops >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"hello\n", b"oops\n"), server.log()
    (rec,) = wait_records(a, lambda rs: len(rs) == 1 and rs[0]["recording_status"] != "recording")
    assert rec["recording_status"] == "complete", rec
    assert rec["unix_user"] == alice.name and rec["exit_status"] == 3
    assert rec["program_type"] == "exec" and rec["command"] == "echo hello; echo oops >&2; exit 3"
    assert rec["client_address"] == "127.0.0.1" and rec["server_port"] == server.port
    assert rec["spool"]["priv_pid"]
    plain, result = decrypt((a.spool / f"{rec['session_id']}.sealed").read_bytes(), a.keys.auditor)
    assert result.completeness is Completeness.COMPLETE
    assert result.signature is SignatureStatus.VALID
    header, events = decode_all(plain)
    assert header.command == "echo hello; echo oops >&2; exit 3"
    output = "".join(e.data for e in events if e.code is Code.OUTPUT)
    assert "hello\n" in output and "oops\n" in output
    time.sleep(2.5)  # past the grace: the PAM session had its recorder, so no unrecorded record
    assert [r["session_id"] for r in a.records()] == [rec["session_id"]]


def test_a_user_process_cannot_open_a_recording(
    agent: Callable[..., Agent], sshd_server: Callable[..., SshdServer], alice: UnixUser
) -> None:
    a = agent()
    server = sshd_server(force_command=a.force_command())
    # from inside a recorded session, speak the protocol to the daemon directly
    script = (
        "import socket,struct,json;"
        "s=socket.socket(socket.AF_UNIX);"
        f"s.connect({str(a.socket)!r});"
        "p=json.dumps({'version':1,'program_type':'shell','pty':False}).encode();"
        "s.sendall(struct.pack('>BI',1,len(p))+p);"
        "h=s.recv(5);print(h[0])"
    )
    r = server.ssh(alice, f'/usr/bin/python3 -c "{script}"')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"3"  # REFUSE
    assert "refused" in a.log.read_text()


def test_control_master_sessions_are_separate_recordings_of_one_pam_session(
    agent: Callable[..., Agent], sshd_server: Callable[..., SshdServer], alice: UnixUser
) -> None:
    a = agent(reconcile_grace=1.0)
    server = sshd_server(force_command=a.force_command(), pam_extra=(a.pam_line(),))
    with server.control_master(alice) as path:
        for i in range(3):
            r = server.ssh(alice, f"echo channel {i}", control_path=path)
            assert r.returncode == 0 and r.stdout == f"channel {i}\n".encode()
        recs = wait_records(
            a, lambda rs: len(rs) == 3 and all(r["recording_status"] == "complete" for r in rs)
        )
        time.sleep(1.5)  # past the grace: nothing unrecorded either
    assert len(a.records()) == 3
    assert len({r["spool"]["priv_pid"] for r in recs}) == 1  # one SSH connection


def test_killed_recorder_is_recorder_lost(
    agent: Callable[..., Agent], sshd_server: Callable[..., SshdServer], alice: UnixUser
) -> None:
    a = agent(frame_interval=0.2)
    server = sshd_server(force_command=a.force_command(), pam_extra=(a.pam_line(),))
    r = server.ssh(alice, "echo before; sleep 0.5; kill -9 $PPID; sleep 5; echo after")
    assert b"before" in r.stdout and b"after" not in r.stdout
    (rec,) = wait_records(a, lambda rs: len(rs) == 1 and rs[0]["recording_status"] != "recording")
    assert rec["recording_status"] == "recorder_lost", rec
    plain, result = decrypt((a.spool / f"{rec['session_id']}.sealed").read_bytes(), a.keys.auditor)
    assert result.completeness is Completeness.TRUNCATED and b"before" in plain


def test_daemon_down_allow_runs_unrecorded_and_is_recorded_later(
    root_work_dir: Path, sshd_server: Callable[..., SshdServer], alice: UnixUser
) -> None:
    a = Agent(root_work_dir, on_daemon_down="allow")
    a.spool.mkdir(mode=0o700)  # installed, but the daemon is not running
    server = sshd_server(force_command=a.force_command(), pam_extra=(a.pam_line(),))
    r = server.ssh(alice, "echo unrecorded")
    assert (r.returncode, r.stdout) == (0, b"unrecorded\n"), r.stderr
    a.start()
    try:
        (rec,) = a.records()
        assert rec["recording_status"] == "unrecorded" and rec["unix_user"] == alice.name
        assert rec["client_address"] == "127.0.0.1" and rec["session_finish"]
    finally:
        a.stop()


def test_daemon_down_deny_refuses(
    root_work_dir: Path, sshd_server: Callable[..., SshdServer], alice: UnixUser
) -> None:
    a = Agent(root_work_dir)
    server = sshd_server(force_command=a.force_command())
    r = server.ssh(alice, "echo should not run")
    assert r.returncode == 1 and b"should not run" not in r.stdout
    assert b"sshaudit: session refused: the recording service is unavailable" in r.stderr


def test_daemon_killed_mid_session_then_restarted(
    agent: Callable[..., Agent], sshd_server: Callable[..., SshdServer], alice: UnixUser
) -> None:
    a = agent(frame_interval=0.2)
    server = sshd_server(force_command=a.force_command())
    argv = [*server.ssh_argv(alice), "-T", server.host, "echo started; sleep 20; echo finished"]
    ssh = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert ssh.stdout is not None and ssh.stdout.readline() == b"started\n"
        (rec,) = wait_records(a, lambda rs: len(rs) == 1)
        sealed = a.spool / f"{rec['session_id']}.sealed"
        deadline = time.monotonic() + 10
        while b"started" not in decrypt(sealed.read_bytes(), a.keys.auditor)[0]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert a.proc is not None
        a.proc.kill()
        a.proc.wait(10)
        out, _ = ssh.communicate(timeout=15)  # policy deny: the session ends
        assert b"finished" not in out
    finally:
        if ssh.poll() is None:
            ssh.kill()
    plain, result = decrypt(sealed.read_bytes(), a.keys.auditor)
    assert result.completeness is Completeness.TRUNCATED and b"started" in plain
    a.start()
    (rec,) = a.records()
    assert rec["recording_status"] == "truncated" and "daemon stopped" in rec["error"]
