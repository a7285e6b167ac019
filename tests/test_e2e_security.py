"""What the recorded user cannot do, end to end (real sshd, recorder, daemon, PAM hook).

- read or write the spool (as the user, over ssh: ls, cat, touch, rm, mv all fail; the
  directory is 0700 root and every file in it 0600 root, unchanged afterwards);
- run anything before the recorder: ``~/.ssh/rc`` (the installer's ``PermitUserRC no``),
  subsystem requests (``ssh -s``: they go through the ForceCommand too, or are refused),
  ``BASH_ENV`` sent with ``SendEnv``/``SetEnv`` (sshd accepts only LANG and LC_*), a planted
  ``~/.bashrc`` (``SetEnv SHLVL=1``). The planted code appends its process ancestry to a
  marker file: it either never ran, or ran under the recorder. Each case also runs once
  without the defence, to show the marker does catch code running before the recorder;
- open a recording pretending to be another session, or speak for PAM, from inside its
  session: refused, and no recording appears.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import Agent
from e2e_helpers import (
    AgentFactory,
    agents,
    evidence,
    evidence_script,
    finished,
    guarded,
    planted,
    read_recording,
    ssh_with_token,
    under_recorder,
)
from sshd_harness import SFTP_SERVER, SshdFactory, SshdServer, client_env
from sshd_host import UnixUser, user_scratch, write_root_file

pytestmark = pytest.mark.e2e


@pytest.fixture
def agent(root_work_dir: Path) -> Iterator[AgentFactory]:
    with agents(root_work_dir) as make:
        yield make


@pytest.fixture
def scratch(bob: UnixUser) -> Iterator[Path]:
    """A directory in bob's home, owned by him (marker files go here), removed afterwards."""
    with user_scratch(bob, "e2e-sec") as path:
        yield path


def recorded(
    sshd_server: SshdFactory,
    a: Agent,
    extra_lines: tuple[str, ...] = (),
    accept_env: tuple[str, ...] = ("LANG", "LC_*"),
) -> SshdServer:
    """The installer's settings: ForceCommand, PermitUserRC no, SetEnv SHLVL=1, the hook,
    and Debian's AcceptEnv."""
    return sshd_server(
        force_command=a.force_command(),
        pam_extra=(a.pam_line(),),
        permit_user_rc=False,
        accept_env=accept_env,
        extra_lines=("SetEnv SHLVL=1", *extra_lines),
    )


def _spool_files(a: Agent) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in a.spool.iterdir():
        st = p.lstat()
        out[p.name] = (
            st.st_uid,
            stat.S_IMODE(st.st_mode),
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
    return out


def test_the_user_can_neither_read_nor_write_the_spool(
    agent: AgentFactory, sshd_server: SshdFactory, bob: UnixUser
) -> None:
    a = agent()
    server = recorded(sshd_server, a)
    assert server.ssh(bob, "echo first").returncode == 0
    (first,) = finished(a, 1)
    sid, spool = first["session_id"], a.spool
    before = _spool_files(a)
    ops = [
        f"ls {spool}",
        f"cat {spool}/{sid}.json",
        f"head -c 10 {spool}/{sid}.sealed",
        f"touch {spool}/planted",
        f"echo x >> {spool}/{sid}.sealed",
        f"rm -f {spool}/{sid}.json",
        f"mv {spool}/{sid}.sealed /tmp/stolen-{os.getpid()}",
        f"ln -s /etc/passwd {spool}/link",
    ]
    script = "".join(f"if {op}; then echo ALLOWED; else echo refused; fi\n" for op in ops)
    done = server.ssh(bob, script)
    assert done.stdout.decode().split() == ["refused"] * len(ops), (done.stdout, done.stderr)
    assert done.stderr.count(b"Permission denied") == len(ops), done.stderr
    finished(a, 2)
    st = spool.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    after = _spool_files(a)
    assert {k: v for k, v in after.items() if k in before} == before  # unchanged
    assert len(after) == 4  # two recordings, two records: nothing planted
    assert all((uid, mode) == (0, 0o600) for uid, mode, _ in after.values()), after


def test_permit_user_rc_no_keeps_ssh_rc_from_running(
    agent: AgentFactory, sshd_server: SshdFactory, bob: UnixUser, scratch: Path
) -> None:
    a = agent()
    marker = scratch / "rc-ran"
    with planted(bob, ".ssh/rc", guarded(evidence_script(marker))):
        assert ssh_with_token(recorded(sshd_server, a), bob, "echo session") == b"session\n"
        assert evidence(marker) == []
        # sshd itself skips ~/.ssh/rc under an admin ForceCommand, even with PermitUserRC
        # yes (OpenSSH 9.2 session.c do_rc_files): PermitUserRC no is a second lock
        rc_yes = sshd_server(force_command=a.force_command(), permit_user_rc=True)
        assert ssh_with_token(rc_yes, bob, "echo session") == b"session\n"
        assert evidence(marker) == []
        # the planted file does run where sshd runs it (no ForceCommand): before the command
        assert ssh_with_token(sshd_server(), bob, "echo session") == b"session\n"
    (line,) = evidence(marker)
    assert not under_recorder(line, a) and f"{bob.name}@notty" in line, line


def test_subsystem_requests_go_through_the_recorder(
    agent: AgentFactory,
    sshd_server: SshdFactory,
    bob: UnixUser,
    scratch: Path,
    root_work_dir: Path,
) -> None:
    a = agent()
    marker = scratch / "subsystem-ran"
    script = write_root_file(root_work_dir / "probe", "#!/bin/sh\n" + evidence_script(marker))
    server = recorded(sshd_server, a, extra_lines=(f"Subsystem probe {script}",))
    assert _sftp_version(server, bob) == 3
    assert server.ssh(bob, "probe", extra_opts=("-s",)).returncode == 0
    (line,) = evidence(marker)
    assert under_recorder(line, a), line
    refused = server.ssh(bob, "anything", extra_opts=("-s",))
    assert refused.returncode != 0 and b"subsystem request failed" in refused.stderr
    records = finished(a, 3)
    kinds = {(r["program_type"], r["command"], r["recording_status"]) for r in records}
    assert kinds == {
        ("subsystem", SFTP_SERVER, "complete"),
        ("exec", str(script), "complete"),
        # the refused request ran nothing; its SSH connection (a PAM session) is on record
        (None, None, "unrecorded"),
    }
    for r in records:
        if r["recording_status"] == "complete":
            assert read_recording(a, r).sealed_to_the_end
        else:
            assert "closed without a recorder" in r["error"] and r["session_finish"]
    assert len(evidence(marker)) == 1


def _sftp_version(server: SshdServer, user: UnixUser) -> int:
    """``ssh -s HOST sftp``: send SSH_FXP_INIT, read SSH_FXP_VERSION (draft-ietf-secsh-
    filexfer-02 4); stdin stays open until the answer (sftp-server quits at EOF at once)."""
    argv = [*server.ssh_argv(user, ("-s",)), "-T", server.host, "sftp"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(struct.pack(">IBI", 5, 1, 3))  # length, SSH_FXP_INIT, version 3
        proc.stdin.flush()
        length, kind, version = struct.unpack(">IBI", proc.stdout.read(9))
        assert kind == 2 and length >= 5  # SSH_FXP_VERSION
    finally:
        proc.stdin.close()
        proc.stdout.read()
        proc.wait(timeout=30)
    assert proc.returncode == 0
    return int(version)


def test_bash_env_cannot_be_sent_to_run_before_the_recorder(
    agent: AgentFactory, sshd_server: SshdFactory, bob: UnixUser, scratch: Path
) -> None:
    a = agent()
    marker = scratch / "bash-env-ran"
    with planted(bob, f"{scratch.name}/env.sh", evidence_script(marker)) as env_file:
        server = recorded(sshd_server, a)
        for opts in (("-o", "SendEnv=BASH_ENV"), ("-o", f"SetEnv=BASH_ENV={env_file}")):
            got = _ssh_with_bash_env(server, bob, env_file, opts)
            assert got == b"unset\n", opts
        assert evidence(marker) == []
        # What AcceptEnv prevents. Debian's bash run by sshd at SHLVL 0 sources ~/.bashrc
        # and skips $BASH_ENV (shell.c run_startup_files); at SHLVL 1, which the installer
        # sets against ~/.bashrc, it sources $BASH_ENV before it runs the ForceCommand.
        lax = recorded(sshd_server, a, accept_env=("LANG", "BASH_ENV"))
        assert _ssh_with_bash_env(lax, bob, env_file, ("-o", "SendEnv=BASH_ENV")) != b"unset\n"
    lines = evidence(marker)
    assert lines and not all(under_recorder(line, a) for line in lines), lines


def _ssh_with_bash_env(
    server: SshdServer, user: UnixUser, env_file: Path, opts: tuple[str, ...]
) -> bytes:
    argv = [*server.ssh_argv(user, opts), "-T", server.host, "echo ${BASH_ENV-unset}"]
    env = {**client_env(), "BASH_ENV": str(env_file)}
    done = subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_planted_bashrc_runs_only_under_the_recorder(
    agent: AgentFactory, sshd_server: SshdFactory, bob: UnixUser, scratch: Path
) -> None:
    a = agent()
    marker = scratch / "bashrc-ran"
    with planted(bob, ".bashrc", guarded(evidence_script(marker))):
        assert ssh_with_token(recorded(sshd_server, a), bob, "echo hi") == b"hi\n"
        (line,) = evidence(marker)  # once: in the session's own `bash -c`, as plain sshd
        assert under_recorder(line, a), line
        # without SetEnv SHLVL=1, Debian's bash sources ~/.bashrc before the recorder too
        marker.unlink()
        no_shlvl = sshd_server(force_command=a.force_command())
        assert ssh_with_token(no_shlvl, bob, "echo hi") == b"hi\n"
    lines = evidence(marker)
    assert len(lines) == 2 and [under_recorder(x, a) for x in lines] == [False, True], lines


FORGER = """
import json, os, socket, struct, sys
def ppid(pid):
    for line in open(f'/proc/{pid}/status'):
        if line.startswith('PPid:'):
            return int(line.split()[1])
priv = os.getpid()
while b'[priv]' not in open(f'/proc/{priv}/cmdline', 'rb').read():
    priv = ppid(priv)
def talk(msg_type, doc):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sys.argv[1])
    body = json.dumps(doc).encode()
    s.sendall(struct.pack('>BI', msg_type, len(body)) + body)
    try:
        head = s.recv(5)
    except OSError as exc:
        head = repr(exc).encode()
    return head[0] if len(head) == 5 else 'closed'
hello = {'version': 1, 'program_type': 'shell', 'command': None, 'term': 'xterm',
         'shell': '/bin/bash', 'width': 80, 'height': 24, 'pty': True, 'tty': '/dev/pts/0',
         'ssh_connection': '203.0.113.9 40000 127.0.0.1 22',
         'ssh_user_auth': 'publickey ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF9rZW5ub3Q='}
pam = {'phase': 'close_session', 'user': 'root', 'rhost': '203.0.113.9', 'service': 'sshd',
       'tty': 'ssh', 'priv_pid': priv, 'auth_info': 'publickey forged\\n'}
print('hello', talk(1, hello))
print('pam', talk(9, pam))
"""


def test_a_process_in_the_session_cannot_open_a_recording_or_speak_for_pam(
    agent: AgentFactory, sshd_server: SshdFactory, bob: UnixUser
) -> None:
    a = agent()
    server = recorded(sshd_server, a)
    code = base64.b64encode(FORGER.encode()).decode()
    # The forger runs as the user inside a recorded session (its ancestry leads to the
    # recorder, not straight to sshd): it claims another session's address, tty and key,
    # then tries to close its own SSH connection's PAM session as root would.
    command = f'python3 -c "$(echo {code} | base64 -d)" {a.socket}'
    done = server.ssh(bob, command)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split("\n")[:2] == ["hello 3", "pam closed"]  # 3: REFUSE
    (own,) = finished(a, 1)  # the session's own recording, and no other
    assert own["command"] == command and own["recording_status"] == "complete"
    assert own["client_address"] == "127.0.0.1" and own["user_email"] == ""
    assert own["details"]["identity_source"] == "pam"
    log = a.log.read_text()
    assert "refused: pid" in log and "PAM message refused" in log
    time.sleep(1.5)  # past nothing: the connection's PAM session was not closed by the
    assert len(a.records()) == 1  # forger, so no unrecorded record either
    assert "203.0.113.9" not in str(a.records())
