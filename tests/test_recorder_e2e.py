"""The recorder as sshd's ForceCommand under a real OpenSSH sshd, with no daemon running.

With ``on_daemon_down = "allow"`` every session must behave exactly as it does on the
same sshd without a ForceCommand (exit codes, signals, streams, 100 MB through ``cat``,
``ssh -n``, scp both ways, ``sftp -b``, rsync, git), including ``internal-sftp``, which the
recorder maps to the sftp-server program; with ``"deny"`` the session is refused with the
one-line reason and exit status 1. Recorded sessions need the real daemon: they are tested
with it (tests/test_daemon_*), not with a stand-in here.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd_harness import SftpMode, SshdFactory, SshdServer
from sshd_host import UnixUser, user_scratch, write_root_file

import sshaudit
from sshaudit.agent.launcher import write_launcher
from sshaudit.agent.record import UNAVAILABLE

pytestmark = pytest.mark.e2e

PACKAGE_PARENT = str(Path(sshaudit.__file__).parent.parent)  # the link tree, not core/
COMMANDS = [
    "true",
    "exit 3",
    "kill -TERM $$",
    "echo out; echo err >&2; exit 7",
    "printf '%s|' \"a  b\" 'c\"d' \"it's\" 'é ü 日本 \U0001f600'; echo",
    "echo one\necho two",
    "echo $0; echo ${SHLVL-unset}; test -t 0 && echo tty || echo notty",
    "cat /nonexistent",
]


@pytest.fixture
def recorder(root_work_dir: Path) -> Path:
    """A root-owned launcher with an ``allow`` and a ``deny`` config, no daemon socket."""
    launcher = root_work_dir / "record"
    write_launcher(str(launcher), sys.executable, PACKAGE_PARENT)
    for policy in ("allow", "deny"):
        text = f'socket = "{root_work_dir}/no-daemon.sock"\n[policy]\non_daemon_down = "{policy}"\n'
        write_root_file(root_work_dir / f"{policy}.toml", text, mode=0o644)
    return launcher


def forced(recorder: Path, policy: str) -> str:
    return f"{recorder} --config {recorder.parent / policy}.toml"


@pytest.fixture
def pair(sshd_server: SshdFactory, recorder: Path) -> tuple[SshdServer, SshdServer]:
    """The same sshd twice: plain, and with the recorder (allow, daemon down)."""
    return sshd_server(), sshd_server(force_command=forced(recorder, "allow"))


@pytest.fixture
def scratch(alice: UnixUser) -> Iterator[Path]:
    """A directory in alice's home, owned by her, removed afterwards."""
    with user_scratch(alice, "e2e") as path:
        yield path


def _as(user: UnixUser, path: Path) -> Path:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chown(p, user.uid, user.gid)
    return path


def test_commands_behave_exactly_as_without_the_recorder(
    pair: tuple[SshdServer, SshdServer], alice: UnixUser
) -> None:
    plain, rec = pair
    for command in COMMANDS:
        for tty in (False, True):
            want = plain.ssh(alice, command, tty=tty)
            got = rec.ssh(alice, command, tty=tty)
            assert (got.returncode, got.stdout, got.stderr) == (
                want.returncode,
                want.stdout,
                want.stderr,
            ), (command, tty)
    assert plain.ssh(alice, "kill -TERM $$").returncode == 255  # exit-signal, not a status


def test_ssh_n_and_stdin_eof(pair: tuple[SshdServer, SshdServer], alice: UnixUser) -> None:
    for server in pair:
        done = server.ssh(alice, "cat; echo end", extra_opts=("-n",))
        assert (done.returncode, done.stdout) == (0, b"end\n")
        done = server.ssh(alice, "cat; echo end", input=b"x" * 100_000)
        assert done.stdout == b"x" * 100_000 + b"end\n"


@pytest.mark.slow
def test_100_mb_through_cat(pair: tuple[SshdServer, SshdServer], alice: UnixUser) -> None:
    data = os.urandom(100 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    times = []
    for server in pair:
        t0 = time.perf_counter()
        done = server.ssh(alice, "cat", input=data, timeout=120)
        times.append(time.perf_counter() - t0)
        assert done.returncode == 0
        assert hashlib.sha256(done.stdout).hexdigest() == digest
    print(f"\n100 MB cat: plain {times[0]:.2f} s, recorder (unrecorded) {times[1]:.2f} s")


@pytest.mark.parametrize("sftp", [SftpMode.SERVER, SftpMode.INTERNAL])
def test_scp_sftp_rsync_git(
    sshd_server: SshdFactory,
    recorder: Path,
    alice: UnixUser,
    scratch: Path,
    tmp_path: Path,
    sftp: SftpMode,
) -> None:
    server = sshd_server(force_command=forced(recorder, "allow"), sftp=sftp)
    blob = os.urandom(300_000)
    (tmp_path / "up.bin").write_bytes(blob)
    run([*server.scp_argv(alice), str(tmp_path / "up.bin"), server.remote(scratch / "up.bin")])
    assert (scratch / "up.bin").read_bytes() == blob
    run([*server.scp_argv(alice), server.remote(scratch / "up.bin"), str(tmp_path / "down.bin")])
    assert (tmp_path / "down.bin").read_bytes() == blob

    batch = tmp_path / "batch"
    batch.write_text(f"put {tmp_path / 'up.bin'} {scratch}/sftp.bin\nls {scratch}\n")
    done = run([*server.sftp_argv(alice), "-b", str(batch), server.host])
    assert (scratch / "sftp.bin").read_bytes() == blob and b"sftp.bin" in done.stdout

    if sftp is SftpMode.SERVER:  # rsync and git do not use the sftp subsystem
        src = tmp_path / "tree"
        (src / "d").mkdir(parents=True)
        (src / "d" / "f.bin").write_bytes(blob)
        run(
            [
                "rsync",
                "-a",
                "-e",
                server.ssh_command(alice),
                f"{src}/",
                server.remote(scratch / "tree"),
            ]
        )
        assert (scratch / "tree" / "d" / "f.bin").read_bytes() == blob
        _git_clone(server, alice, scratch, tmp_path)


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False, env=env)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done


def _git_clone(server: SshdServer, alice: UnixUser, scratch: Path, tmp_path: Path) -> None:
    repo = scratch / "repo"
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
    }
    run(["git", "init", "-q", "-b", "main", str(repo)], env)
    (repo / "hello.txt").write_text("hello over ssh\n")
    run(["git", "-C", str(repo), "add", "hello.txt"], env)
    run(["git", "-C", str(repo), "commit", "-q", "-m", "one"], env)
    _as(alice, repo)
    clone_env = {**env, "GIT_SSH_COMMAND": server.ssh_command(alice)}
    run(["git", "clone", "-q", server.remote(repo), str(tmp_path / "clone")], clone_env)
    assert (tmp_path / "clone" / "hello.txt").read_text() == "hello over ssh\n"


def test_deny_refuses_with_the_message(
    sshd_server: SshdFactory, recorder: Path, alice: UnixUser, scratch: Path
) -> None:
    server = sshd_server(force_command=forced(recorder, "deny"))
    for tty in (False, True):
        done = server.ssh(alice, f"touch {scratch}/ran", tty=tty)
        assert done.returncode == 1
        assert UNAVAILABLE.encode() in done.stdout + done.stderr
    assert not (scratch / "ran").exists()
    done = subprocess.run(
        [*server.sftp_argv(alice), "-b", "/dev/null", server.host],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0


def test_debian_bash_sources_bashrc_before_the_force_command(
    sshd_server: SshdFactory, recorder: Path, alice: UnixUser, scratch: Path
) -> None:
    """A fact of Debian's bash (built with SSH_SOURCE_BASHRC), recorded here for the design.

    sshd runs the ForceCommand as ``bash -c "<ForceCommand>"`` with SSH_CLIENT set and no
    SHLVL, so bash sources ~/.bashrc before the recorder starts: user code runs unrecorded
    first. ``SetEnv SHLVL=1`` in sshd_config stops that (bash skips the rc file at level 2).
    The recorder removes SHLVL from the session's environment, so the user's own command
    still sees its ~/.bashrc exactly as without the recorder.
    """
    marker = scratch / "bashrc-runs"
    bashrc = alice.home / ".bashrc"
    saved = bashrc.read_bytes() if bashrc.exists() else None
    # Active only for this test's connections (LC_* passes AcceptEnv), so tests running
    # at the same time as alice are not disturbed.
    hook = (
        f'if [ "${{LC_SSHAUDIT_TEST-}}" = {os.getpid()} ]; then\n'
        f'  echo "$0" >> {marker}; greet() {{ echo hi-from-bashrc; }}\nfi\n'
    )
    bashrc.write_bytes(hook.encode() + (saved or b""))  # first: Debian's returns early
    os.chown(bashrc, alice.uid, alice.gid)
    opts = ("-o", "SendEnv=LC_SSHAUDIT_TEST")
    env = {**os.environ, "LC_SSHAUDIT_TEST": str(os.getpid())}

    def runs(server: SshdServer) -> tuple[bytes, list[str]]:
        marker.unlink(missing_ok=True)
        argv = [*server.ssh_argv(alice, opts), "-T", server.host, "greet"]
        done = subprocess.run(
            argv, env=env, capture_output=True, timeout=30, stdin=subprocess.DEVNULL, check=False
        )
        assert done.returncode == 0, done.stderr
        lines = marker.read_text().split() if marker.exists() else []
        return done.stdout, lines

    try:
        plain = runs(sshd_server())
        assert plain == (b"hi-from-bashrc\n", ["bash"])
        out, lines = runs(sshd_server(force_command=forced(recorder, "allow")))
        assert out == b"hi-from-bashrc\n"  # the user's command behaves as without us
        assert lines == ["bash", "bash"]  # once before the recorder, once in the session
        guarded = sshd_server(
            force_command=forced(recorder, "allow"), extra_lines=("SetEnv SHLVL=1",)
        )
        assert runs(guarded) == (b"hi-from-bashrc\n", ["bash"])  # only inside the session
    finally:
        if saved is None:
            bashrc.unlink()
        else:
            bashrc.write_bytes(saved)
