"""The sshd harness works, and the OpenSSH facts DESIGN.md relies on hold on this build.

Each test starts its own real sshd (about 0.1 s) and talks to it with the real clients.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pty_session import PtySession, PtyWaitError
from sshd_harness import SftpMode, SshdConfig, SshdFactory, wait_gone
from sshd_host import (
    BASE_DIR,
    LINK_DIR,
    NAME_PREFIX,
    PAM_DIR,
    HarnessEnv,
    KeyPair,
    SshdHarnessError,
    UnixUser,
    authorize_key,
    sweep_stale,
    write_root_file,
)

pytestmark = pytest.mark.e2e

# What sshd hands a ForceCommand, and who its parent processes are (read from /proc,
# which the user can read: the titles are what OpenSSH's setproctitle wrote over argv).
PROBE = r"""#!/bin/sh
printf 'ORIG=%s\n' "$SSH_ORIGINAL_COMMAND"
printf 'CONN=%s\n' "$SSH_CONNECTION"
printf 'AUTHFILE=%s\n' "${SSH_USER_AUTH-unset}"
if [ -n "${SSH_USER_AUTH-}" ]; then sed 's/^/AUTH=/' "$SSH_USER_AUTH"; fi
printf 'TTY=%s\n' "${SSH_TTY-}"
printf 'UID=%s\n' "$(id -u)"
p=$PPID
for i in 1 2 3; do
  uid=$(awk '/^Uid:/{print $2}' "/proc/$p/status")
  printf 'ANC%s=%s %s %s\n' "$i" "$p" "$uid" "$(tr '\0' ' ' <"/proc/$p/cmdline")"
  p=$(awk '/^PPid:/{print $2}' "/proc/$p/status")
done
"""


def parse(output: bytes) -> dict[str, list[str]]:
    info: dict[str, list[str]] = {}
    for line in output.decode().replace("\r\n", "\n").splitlines():
        key, _, value = line.partition("=")
        info.setdefault(key, []).append(value.rstrip())
    return info


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(argv, capture_output=True, timeout=30, check=False, env=env)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done


@pytest.fixture
def probe(root_work_dir: Path) -> Path:
    return write_root_file(root_work_dir / "probe", PROBE)


@pytest.fixture
def token(alice: UnixUser) -> Iterator[str]:
    """A unique name prefix; whatever a test leaves under it in alice's home is removed."""
    tok = f"t-{secrets.token_hex(4)}"
    yield tok
    for path in alice.home.glob(tok + "*"):
        subprocess.run(["rm", "-rf", "--", str(path)], check=True)


def test_exec_output_status_and_streams(sshd_server: SshdFactory, alice: UnixUser) -> None:
    server = sshd_server()
    assert server.ssh(alice, "true").returncode == 0
    done = server.ssh(alice, "echo hi; echo oops >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, b"hi\n", b"oops\n")
    assert server.ssh(alice, "id -un").stdout == b"sshaudit-alice\n"
    blob = bytes(range(256)) * 64
    assert server.ssh(alice, "cat", input=blob).stdout == blob


def test_host_key_is_checked_strictly(sshd_server: SshdFactory, alice: UnixUser) -> None:
    server = sshd_server()
    done = server.ssh(alice, "true", extra_opts=("-o", "UserKnownHostsFile=/dev/null"))
    assert done.returncode == 255
    assert b"Host key verification failed" in done.stderr


def test_force_command_environment(
    sshd_server: SshdFactory, alice: UnixUser, probe: Path, sshd_env: HarnessEnv
) -> None:
    server = sshd_server(force_command=str(probe))
    done = server.ssh(alice, "echo 'a  b'", "$HOME")
    assert done.returncode == 0, done.stderr
    info = parse(done.stdout)
    assert info["ORIG"] == ["echo 'a  b' $HOME"]  # ssh joins the words with single spaces
    client, _cport, *local = info["CONN"][0].split()
    assert (client, local) == ("127.0.0.1", ["127.0.0.1", str(server.port)])
    key_type, key_b64 = sshd_env.key.public_line().split()[:2]
    assert info["AUTH"] == [f"publickey {key_type} {key_b64}"]
    assert info["UID"] == [str(alice.uid)]
    assert info["TTY"] == [""]

    quiet = sshd_server(force_command=str(probe), expose_auth_info=False)
    info = parse(quiet.ssh(alice, "x").stdout)
    assert info["AUTHFILE"] == ["unset"]
    assert "AUTH" not in info


def test_process_tree_of_a_session(sshd_server: SshdFactory, alice: UnixUser, probe: Path) -> None:
    server = sshd_server(force_command=str(probe))
    prog = re.escape(server.pam_service)  # the titles start with the program name, not "sshd"
    notty = parse(server.ssh(alice, "x").stdout)
    pty = parse(server.ssh(alice, "x", tty=True).stdout)
    tty = pty["TTY"][0].removeprefix("/dev/")
    assert re.fullmatch(r"pts/\d+", tty), pty
    for info, session in ((notty, "notty"), (pty, tty)):
        parent, grandparent, listener = (info[f"ANC{i}"][0].split(" ", 2) for i in (1, 2, 3))
        assert parent[1] == str(alice.uid)
        assert re.fullmatch(rf"{prog}: sshaudit-alice@{re.escape(session)}", parent[2]), parent
        assert grandparent[1] == "0"
        assert re.fullmatch(rf"{prog}: sshaudit-alice \[priv\]", grandparent[2]), grandparent
        assert listener[0] == str(server.pid)
        assert listener[2].startswith(f"{server.pam_service}: {server.link} -D -f"), listener


def test_interactive_login_shell_and_resize(sshd_server: SshdFactory, alice: UnixUser) -> None:
    server = sshd_server()
    with server.interactive(alice, rows=24, cols=80) as term:
        term.send("echo hello\r")
        term.read_line("hello")  # the output line, not the echo of the command
        term.send("shopt -q login_shell && echo LOGIN-$((40+2))\r")
        term.read_until(b"LOGIN-42")
        term.send("stty size\r")
        term.read_line("24 80")
        term.set_size(40, 132)
        for _attempt in range(10):  # the window-change message races the next command
            term.send("stty size\r")
            try:
                term.read_line("40 132", timeout=1.0)
                break
            except PtyWaitError:
                continue
        else:
            pytest.fail(f"the resize never reached the remote pty: {bytes(term.output)!r}")
        term.send("exit 7\r")
        assert term.wait() == 7


def test_pty_session_alone() -> None:
    script = 'trap "stty size" WINCH; echo ready; while :; do sleep 0.05; done'
    with PtySession(["sh", "-c", script], rows=10, cols=20) as term:
        term.read_until(b"ready")
        with pytest.raises(PtyWaitError, match="unconsumed output"):
            term.read_until(b"never printed", timeout=0.2)
        term.set_size(30, 100)
        term.read_until(b"30 100")
        assert term.close() != 0  # hung up: sh dies of SIGHUP


def test_scp_and_sftp(
    sshd_server: SshdFactory, alice: UnixUser, tmp_path: Path, token: str
) -> None:
    server = sshd_server()
    data = os.urandom(100_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    run([*server.scp_argv(alice), str(src), server.remote(f"{token}-scp.bin")])
    uploaded = alice.home / f"{token}-scp.bin"
    assert uploaded.read_bytes() == data
    assert uploaded.stat().st_uid == alice.uid
    run([*server.scp_argv(alice), server.remote(f"{token}-scp.bin"), str(tmp_path / "back.bin")])
    assert (tmp_path / "back.bin").read_bytes() == data

    batch = tmp_path / "batch"
    batch.write_text(f"put {src} {token}-sftp.bin\nget {token}-sftp.bin {tmp_path}/sftp.bin\n")
    run([*server.sftp_argv(alice), "-b", str(batch), server.host])
    assert (alice.home / f"{token}-sftp.bin").read_bytes() == data
    assert (tmp_path / "sftp.bin").read_bytes() == data


def test_sftp_modes(sshd_server: SshdFactory, alice: UnixUser, tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    batch.write_text("pwd\n")
    internal = sshd_server(sftp=SftpMode.INTERNAL)
    done = run([*internal.sftp_argv(alice), "-b", str(batch), internal.host])
    assert str(alice.home).encode() in done.stdout
    none = sshd_server(sftp=SftpMode.NONE)
    argv = [*none.sftp_argv(alice), "-b", str(batch), none.host]
    assert subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode != 0


def test_rsync_and_git(
    sshd_server: SshdFactory, alice: UnixUser, tmp_path: Path, token: str
) -> None:
    server = sshd_server()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("rsync me\n")
    run(["rsync", "-a", "-e", server.ssh_command(alice), f"{tree}/", server.remote(f"{token}-rs/")])
    assert (alice.home / f"{token}-rs" / "sub" / "f.txt").read_text() == "rsync me\n"

    env = {**os.environ, "GIT_SSH_COMMAND": server.ssh_command(alice)}
    bare = alice.home / f"{token}-repo.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(bare)])
    run(["chown", "-R", f"{alice.uid}:{alice.gid}", str(bare)])
    work = tmp_path / "work"
    run(["git", "init", "-q", "-b", "main", str(work)])
    (work / "README").write_text("over ssh\n")
    ident = ["-c", "user.name=Test", "-c", "user.email=test@example.com"]
    run(["git", "-C", str(work), "add", "README"])
    run(["git", "-C", str(work), *ident, "commit", "-q", "-m", "one"])
    run(["git", "-C", str(work), "push", "-q", server.remote(bare), "main"], env=env)
    run(["git", "clone", "-q", server.remote(bare), str(tmp_path / "clone")], env=env)
    assert (tmp_path / "clone" / "README").read_text() == "over ssh\n"


def _wait_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {count} lines after {timeout} s")


def test_private_pam_service(
    sshd_server: SshdFactory, alice: UnixUser, root_work_dir: Path
) -> None:
    marker = root_work_dir / "pam.log"
    fields = "$PAM_TYPE|$PAM_SERVICE|$PAM_USER|$PAM_RHOST|$PAM_TTY|$SSH_CONNECTION"
    hook = write_root_file(root_work_dir / "hook", f'#!/bin/sh\necho "{fields}" >>{marker}\n')
    server = sshd_server(pam_extra=(f"session optional pam_exec.so {hook}",))
    assert str(hook) not in (PAM_DIR / "sshd").read_text()
    assert server.ssh(alice, "true").returncode == 0
    lines = _wait_lines(marker, 2)  # close_session runs as the connection ends
    assert [line.split("|")[0] for line in lines] == ["open_session", "close_session"]
    for line in lines:
        _type, service, user, rhost, pam_tty, conn = line.split("|")
        assert (service, user, rhost, pam_tty) == (
            server.pam_service,
            alice.name,
            "127.0.0.1",
            "ssh",
        )
        assert conn.endswith(f" 127.0.0.1 {server.port}"), conn


def test_private_pam_account_stack_is_enforced(sshd_server: SshdFactory, alice: UnixUser) -> None:
    server = sshd_server(pam_extra=("account requisite pam_deny.so",))
    done = server.ssh(alice, "true")
    assert done.returncode == 255
    assert "by PAM account configuration" in server.log()


def test_password_star_works_without_pam(sshd_server: SshdFactory, alice: UnixUser) -> None:
    shadow = {
        line.split(":")[0]: line.split(":")[1]
        for line in Path("/etc/shadow").read_text().splitlines()
    }
    assert shadow[alice.name] == "*"
    server = sshd_server(use_pam=False)
    assert server.ssh(alice, "true").returncode == 0
    assert "UsePAM no" in server.config_path.read_text()


def test_control_master_multiplexes(sshd_server: SshdFactory, alice: UnixUser) -> None:
    server = sshd_server()
    with server.control_master(alice) as socket_path:
        outs = [server.ssh(alice, f"echo {i}", control_path=socket_path).stdout for i in range(3)]
    assert outs == [b"0\n", b"1\n", b"2\n"]
    log = server.log()
    assert log.count("Accepted publickey") == 1
    assert log.count("Starting session: command") == 3


@pytest.mark.slow
def test_fifty_concurrent_sessions(sshd_server: SshdFactory, alice: UnixUser) -> None:
    server = sshd_server()
    argv = [*server.ssh_argv(alice), "-T", server.host]
    procs = [
        subprocess.Popen(
            [*argv, f"sleep 1; echo {i}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(50)
    ]
    results = [(p.communicate(timeout=60), p.returncode) for p in procs]
    assert [(out, rc) for (out, _err), rc in results] == [(f"{i}\n".encode(), 0) for i in range(50)]
    assert server.log().count("Accepted publickey") == 50


def test_bad_config_is_reported(sshd_server: SshdFactory) -> None:
    with pytest.raises(SshdHarnessError, match=r"(?s)sshd -t failed.*Bad configuration option"):
        sshd_server(extra_lines=("NoSuchOption yes",))
    assert not list(LINK_DIR.glob(f"{NAME_PREFIX}{os.getpid()}-*"))
    assert not list(PAM_DIR.glob(f"{NAME_PREFIX}{os.getpid()}-*"))
    with pytest.raises(SshdHarnessError, match="newline"):
        SshdConfig(force_command="/bin/true\nPermitRootLogin yes")


def test_stop_ends_sessions_and_removes_files(sshd_server: SshdFactory, alice: UnixUser) -> None:
    server = sshd_server()
    client = subprocess.Popen(
        [*server.ssh_argv(alice), "-T", server.host, "sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while "Starting session" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = psutil.Process(server.pid).children(recursive=True)
        assert alice.name in {p.username() for p in tree}
        server.stop()
        assert not wait_gone(tree, timeout=0)  # stop() waited for every session process
        assert client.wait(timeout=10) != 0
    finally:
        client.kill()
        client.wait()
    for path in (server.link, server.pam_file, server.private_dir):
        assert not path.exists()
    assert "Received signal 15" in server.log()


def test_sweep_removes_only_dead_runs(
    sshd_env: HarnessEnv, alice: UnixUser, tmp_path: Path
) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    # A key a dead run left in authorized_keys goes when the next run authorizes its own.
    stale = KeyPair(tmp_path / "stale", tmp_path / "stale.pub")
    stale.public.write_text(f"ssh-ed25519 AAAAstale sshaudit-test-{dead.pid}-0badc0de\n")
    authorize_key(alice, stale)
    authorize_key(alice, sshd_env.key)
    keys = (alice.home / ".ssh" / "authorized_keys").read_text().splitlines()
    assert stale.public_line() not in keys
    assert sshd_env.key.public_line() in keys
    leftovers = {}
    for pid in (dead.pid, os.getpid()):
        ident = f"{pid}-{secrets.token_hex(4)}"
        link, pam, srv = (
            LINK_DIR / (NAME_PREFIX + ident),
            PAM_DIR / (NAME_PREFIX + ident),
            BASE_DIR / f"srv-{ident}",
        )
        link.symlink_to("/usr/sbin/sshd")
        pam.write_text("# test\n")
        srv.mkdir()
        leftovers[pid] = (link, pam, srv)
    try:
        removed = sweep_stale()
        assert set(leftovers[dead.pid]) <= set(removed)
        assert not any(p.exists() or p.is_symlink() for p in leftovers[dead.pid])
        assert all(p.exists() for p in leftovers[os.getpid()])
    finally:
        link, pam, srv = leftovers[os.getpid()]
        link.unlink()
        pam.unlink()
        srv.rmdir()
