"""agent/peer.py: SO_PEERCRED and the ancestry check, on a fake process table and on real
process trees shaped like sshd's (a root ``sshd: USER [priv]`` process, a ``sshd: USER@notty``
child running as the user, the recorder below it), connecting to a real Unix socket."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sshaudit.agent.peer import (
    AncestryCheck,
    Lineage,
    PeerCred,
    PeerError,
    ProcInfo,
    check_pam_peer,
    peer_cred,
    psutil_lookup,
    sshd_executable,
)

PY = "/usr/bin/python3"
SSHD = "/usr/sbin/sshd"
SH = os.path.realpath("/bin/sh")


def table(*procs: ProcInfo) -> AncestryCheck:
    by_pid = {p.pid: p for p in procs}

    def lookup(pid: int) -> ProcInfo:
        if pid not in by_pid:
            raise PeerError(f"process {pid} cannot be inspected")
        return by_pid[pid]

    return AncestryCheck(
        lookup,
        shells=lambda uid: frozenset({SH}),
        uid_of=lambda n: 1000,
        is_sshd=lambda exe: exe == SSHD,
    )


def proc(pid: int, ppid: int, uid: int, title: str, exe: str = PY) -> ProcInfo:
    return ProcInfo(pid, ppid, (uid, uid, uid), title, exe)


PRIV = proc(10, 1, 0, "sshd: jdoe [priv]", SSHD)
SESS = proc(11, 10, 1000, "sshd: jdoe@pts/0", SSHD)
REC = proc(12, 11, 1000, "/usr/bin/python3")


def test_a_recorder_under_sshd_passes() -> None:
    check = table(PRIV, SESS, REC)
    assert check(PeerCred(12, 1000, 1000)) == Lineage("jdoe", 1000, 10, 11)


@pytest.mark.parametrize(
    "title",
    [
        "sshd: jdoe@notty",
        "sshd: jdoe@pts/0,pts/1",
        "sshd-session: jdoe@pts/4",
        "sshd-sshaudit-test-1-ab: jdoe@notty",
    ],
)
def test_session_title_variants(title: str) -> None:
    priv_title = title.split(":")[0] + ": jdoe [priv]"
    check = table(proc(10, 1, 0, priv_title, SSHD), proc(11, 10, 1000, title, SSHD), REC)
    assert check(PeerCred(12, 1000, 1000)).priv_pid == 10


def test_one_login_shell_in_between_passes() -> None:
    shell = proc(12, 11, 1000, "bash", SH)
    rec = proc(13, 12, 1000, "/usr/bin/python3")
    assert table(PRIV, SESS, shell, rec)(PeerCred(13, 1000, 1000)).session_pid == 11


@pytest.mark.parametrize(
    ("procs", "pid", "uid", "reason"),
    [
        # a process the user started inside the session: its parent is the user's shell,
        # whose parent is the recorder (python), not sshd
        (
            (PRIV, SESS, REC, proc(13, 12, 1000, "bash", SH), proc(14, 13, 1000, "evil")),
            14,
            1000,
            "not started by an sshd session",
        ),
        # the user's login shell itself (child of the recorder) connecting
        (
            (PRIV, SESS, REC, proc(13, 12, 1000, "-bash", SH)),
            13,
            1000,
            "neither an sshd session process nor a login shell",
        ),
        # a fake "sshd: jdoe@pts/0" title made by the user under the recorder (its exe is
        # not an installed sshd)
        (
            (PRIV, SESS, REC, proc(13, 12, 1000, "sshd: jdoe@pts/0"), proc(14, 13, 1000, "x")),
            14,
            1000,
            "not started by an sshd session",
        ),
        # ... even running a copy of sshd, under the recorder: no root [priv] parent
        (
            (
                PRIV,
                SESS,
                REC,
                proc(13, 12, 1000, "sshd: jdoe@pts/0", SSHD),
                proc(14, 13, 1000, "x"),
            ),
            14,
            1000,
            "not a child of a root",
        ),
        # the [priv] process is not root
        (
            (proc(10, 1, 1000, "sshd: jdoe [priv]", SSHD), SESS, REC),
            12,
            1000,
            "not a child of a root",
        ),
        # [priv] names another user
        ((proc(10, 1, 0, "sshd: bob [priv]", SSHD), SESS, REC), 12, 1000, "not a child of a root"),
        # a root process titled like [priv] that is not sshd
        ((proc(10, 1, 0, "sshd: jdoe [priv]"), SESS, REC), 12, 1000, "not a child of a root"),
        # the peer's uid is not the session's user
        ((PRIV, SESS, proc(12, 11, 1001, "python")), 12, 1001, "is not sshd's user"),
        # the uid changed since connect (setuid program)
        ((PRIV, SESS, REC), 12, 0, "uid changed"),
        # the process is gone
        ((PRIV, SESS), 12, 1000, "cannot be inspected"),
    ],
)
def test_refusals(procs: tuple[ProcInfo, ...], pid: int, uid: int, reason: str) -> None:
    with pytest.raises(PeerError, match=reason):
        table(*procs)(PeerCred(pid, uid, uid))


def test_pam_peer_must_be_root() -> None:
    check_pam_peer(PeerCred(5, 0, 0))
    with pytest.raises(PeerError, match="not root"):
        check_pam_peer(PeerCred(5, 1000, 1000))


def test_peer_cred_and_psutil_lookup_of_this_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        cred = peer_cred(a)
    assert cred == PeerCred(os.getpid(), os.geteuid(), os.getegid())
    info = psutil_lookup(os.getpid())
    assert info.ppid == os.getppid() and info.uids[0] == os.getuid()
    assert info.exe == os.path.realpath(info.exe)
    with pytest.raises(PeerError):
        psutil_lookup(2**22 + 12345)  # above pid_max: never a process


# -- real process trees ---------------------------------------------------------------------

TREE = r"""
import os, socket, subprocess, sys, time
role, mode, path, user, py = sys.argv[1:6]
import pwd
gid = pwd.getpwnam(user).pw_gid
me = os.path.abspath(__file__)
def run(argv, **kw):
    p = subprocess.Popen(argv, executable=py if argv[0] != "/bin/sh" else None, **kw)
    sys.exit(p.wait())
if role == "priv":
    run([f"sshd: {user}@notty", me, "session", mode, path, user, py],
        user=user, group=gid, extra_groups=[])
elif role == "session":
    if mode == "shell":
        run(["/bin/sh", "-c", f"{py} {me} recorder {mode} {path} {user} {py}; exit $?"])
    run([py, me, "recorder", mode, path, user, py])
elif role == "recorder" and mode in ("inside", "login-shell"):
    if mode == "login-shell":
        run(["/bin/sh", "-c", f"{py} {me} connect {mode} {path} {user} {py}; exit $?"])
    run([py, me, "connect", mode, path, user, py])
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.recv(1)
"""


def _user() -> str | None:
    for name in ("nobody", "daemon"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory the unprivileged test user can reach (pytest's tmp dirs are 0700)."""
    if os.geteuid() != 0:
        pytest.skip("REAL PROCESS-TREE PEER TESTS NOT RUN: they need root (setuid children)")
    d = Path(tempfile.mkdtemp(prefix="sshaudit-peer-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_tree(d: Path, mode: str) -> tuple[PeerCred, Lineage | PeerError, int]:
    user = _user()
    if user is None:
        pytest.skip("REAL PROCESS-TREE PEER TESTS NOT RUN: no 'nobody' or 'daemon' user")
    script = d / "tree.py"
    script.write_text(TREE)
    script.chmod(0o644)
    path = d / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o666)
    server.listen(1)
    server.settimeout(20)
    tree = subprocess.Popen(
        [f"sshd: {user} [priv]", str(script), "priv", mode, str(path), user, PY],
        executable=PY,
    )
    try:
        conn, _ = server.accept()
        with conn:
            cred = peer_cred(conn)
            try:
                # the simulated sshd processes are python with sshd's titles
                is_py = lambda exe: exe == os.path.realpath(PY)  # noqa: E731
                result: Lineage | PeerError = AncestryCheck(is_sshd=is_py)(cred)
            except PeerError as exc:
                result = exc
    finally:
        server.close()
        tree.wait(timeout=20)
    return cred, result, tree.pid


@pytest.mark.parametrize("mode", ["direct", "shell"])
def test_real_tree_recorder_is_accepted(world_dir: Path, mode: str) -> None:
    cred, result, priv_pid = run_tree(world_dir, mode)
    assert isinstance(result, Lineage), result
    assert result.priv_pid == priv_pid and result.uid == cred.uid
    assert result.user == _user() and cred.uid == pwd.getpwnam(result.user).pw_uid


@pytest.mark.parametrize("mode", ["inside", "login-shell"])
def test_real_tree_process_inside_the_session_is_refused(world_dir: Path, mode: str) -> None:
    _, result, _ = run_tree(world_dir, mode)
    assert isinstance(result, PeerError), result


def test_sshd_executable_needs_a_root_owned_sshd(tmp_path: Path) -> None:
    assert sshd_executable(os.path.realpath(SSHD))
    assert not sshd_executable(os.path.realpath(PY))
    copy = tmp_path / "sshd"
    shutil.copy(SSHD, copy)
    os.chown(copy, 1000, 1000)
    assert not sshd_executable(str(copy))  # a user's copy of sshd
    os.chown(copy, 0, 0)
    copy.chmod(0o777)
    assert not sshd_executable(str(copy))  # writable by others
