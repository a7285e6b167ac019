"""Recorded exec sessions end to end: a real sshd whose ForceCommand is the recorder, the real
daemon (recording on) and PAM hook, against a second sshd without ForceCommand (plain).

The user must see exactly what plain sshd gives (exit codes, death by signal, stdout and
stderr apart, quoting, newlines, unicode, ``ssh -n``, 100 MB through ``cat``, scp, sftp,
rsync, git); every session leaves a complete, signed recording whose metadata (byte counts,
SHA-256 of each stream) matches what went through, with content capped at the policy cap;
and 50 sessions at once leave 50 such recordings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import Agent
from e2e_helpers import AgentFactory, Record, Recording, agents, finished, read_recording
from sshd_harness import SFTP_SERVER, SshdFactory, SshdServer, client_env
from sshd_host import UnixUser, user_scratch

pytestmark = pytest.mark.e2e
CAP = 64 * 1024
COMMANDS = [
    "true",
    "exit 3",
    "kill -TERM $$",
    "echo out; echo err >&2; exit 7",
    "printf '%s|' \"a  b\" 'c\"d' \"it's\" 'é ü 日本 \U0001f600'; echo",
    "echo one\necho two",
    "printf 'no newline at the end'",
    "cat /nonexistent",
]
TTY_COMMANDS = COMMANDS[1:4]


@pytest.fixture
def agent(root_work_dir: Path) -> Iterator[AgentFactory]:
    with agents(root_work_dir) as make:
        yield make


@pytest.fixture
def scratch(alice: UnixUser) -> Iterator[Path]:
    """A directory in alice's home, owned by her, removed afterwards."""
    with user_scratch(alice, "e2e-exec") as path:
        yield path


def recorded_server(sshd_server: SshdFactory, a: Agent) -> SshdServer:
    return sshd_server(force_command=a.force_command(), pam_extra=(a.pam_line(),))


def streams(rec: Recording | Record) -> dict[str, dict[str, Any]]:
    record = rec.record if isinstance(rec, Recording) else rec
    out: dict[str, dict[str, Any]] = record["details"]["streams"]
    return out


def test_exec_results_are_those_of_plain_sshd(
    agent: AgentFactory, sshd_server: SshdFactory, alice: UnixUser
) -> None:
    a = agent(exec_capture_cap=CAP)
    plain, server = sshd_server(), recorded_server(sshd_server, a)
    want: dict[tuple[str, bool], subprocess.CompletedProcess[bytes]] = {}
    runs = [(c, False) for c in COMMANDS] + [(c, True) for c in TTY_COMMANDS]
    for command, tty in runs:
        expected = plain.ssh(alice, command, tty=tty)
        got = server.ssh(alice, command, tty=tty)
        assert (got.returncode, got.stdout, got.stderr) == (
            expected.returncode,
            expected.stdout,
            expected.stderr,
        ), (command, tty)
        want[command, tty] = expected
    assert want["exit 3", False].returncode == 3
    assert want["kill -TERM $$", False].returncode == 255  # exit-signal, not a status
    assert want["echo out; echo err >&2; exit 7", False].stderr == b"err\n"

    records = finished(a, len(runs))
    assert sorted((r["command"], r["details"]["pty"]) for r in records) == sorted(runs)
    for r in records:
        rec = read_recording(a, r)
        expected = want[r["command"], r["details"]["pty"]]
        assert r["recording_status"] == "complete" and rec.sealed_to_the_end, r
        assert r["program_type"] == "exec" and rec.header.command == r["command"]
        if r["command"] == "kill -TERM $$":
            assert (r["exit_status"], r["details"]["signal"]) == (None, 15)
            assert "sshaudit: killed by signal 15" in rec.markers
        else:
            assert r["exit_status"] == expected.returncode
            assert f"sshaudit: exit status {expected.returncode}" in rec.markers
        if not r["details"]["pty"]:  # stdout and stderr counted apart, as the user got them
            s = streams(r)
            assert s["stdout"]["bytes"] == len(expected.stdout), r
            assert s["stderr"]["bytes"] == len(expected.stderr), r
            # both in the recording ("o" events; stdout and stderr are read apart, so
            # which of the two comes first is up to the relay's poll)
            out, err = expected.stdout.decode(), expected.stderr.decode()
            assert out in rec.output and err in rec.output
            assert len(rec.output) == len(out) + len(err)


def test_ssh_n_and_stdin(agent: AgentFactory, sshd_server: SshdFactory, alice: UnixUser) -> None:
    a = agent(exec_capture_cap=CAP)
    server = recorded_server(sshd_server, a)
    done = server.ssh(alice, "cat; echo end", extra_opts=("-n",))
    assert (done.returncode, done.stdout, done.stderr) == (0, b"end\n", b"")
    done = server.ssh(alice, "wc -c", input=b"b" * 200_000)
    assert done.stdout.strip() == b"200000"
    by_command = {r["command"]: read_recording(a, r) for r in finished(a, 2)}
    n = by_command["cat; echo end"]
    assert streams(n)["stdin"]["bytes"] == 0 and n.input == "" and n.output == "end\n"
    wc = by_command["wc -c"]
    assert streams(wc)["stdin"] == {
        "bytes": 200_000,
        "captured": CAP,
        "sha256": hashlib.sha256(b"b" * 200_000).hexdigest(),
    }
    assert wc.input == "b" * CAP  # the content, capped at the policy's cap exactly
    assert wc.record["bytes_in"] == 200_000 and wc.sealed_to_the_end


@pytest.mark.slow
def test_100_mb_through_cat_is_intact_and_recorded_as_metadata(
    agent: AgentFactory, sshd_server: SshdFactory, alice: UnixUser
) -> None:
    a = agent(exec_capture_cap=CAP)
    server = recorded_server(sshd_server, a)
    data = os.urandom(100 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    t0 = time.perf_counter()
    done = server.ssh(alice, "cat", input=data, timeout=120)
    elapsed = time.perf_counter() - t0
    assert done.returncode == 0 and done.stderr == b""
    assert len(done.stdout) == len(data) and hashlib.sha256(done.stdout).hexdigest() == digest
    del done, data
    (r,) = finished(a, 1)
    rec = read_recording(a, r)
    assert r["recording_status"] == "complete" and rec.sealed_to_the_end
    meta = {"bytes": 100 * 1024 * 1024, "captured": CAP, "sha256": digest}
    assert streams(r)["stdin"] == meta and streams(r)["stdout"] == meta
    assert r["bytes_in"] == r["bytes_out"] == 100 * 1024 * 1024
    for name in ("stdin", "stdout"):
        label = (
            f"sshaudit: {name}: {100 * 1024 * 1024} bytes, first {CAP} recorded, sha256 {digest}"
        )
        assert label in rec.markers
    # capped: the sealed file holds the first CAP bytes each way, not 200 MB (random bytes
    # take more room than themselves: U+FFFD escapes plus markers naming the bytes)
    assert r["spool"]["sealed_bytes"] < 40 * CAP
    print(f"\n100 MB through a recorded `cat`: {elapsed:.2f} s")


def _run(argv: list[str], env: dict[str, str] | None = None) -> bytes:
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False, env=env)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


def _transfers(server: SshdServer, user: UnixUser, remote: Path, local: Path) -> dict[str, bytes]:
    """scp up and down, sftp -b, rsync -e ssh, git clone; what each left, by name."""
    blob = (local / "up.bin").read_bytes()
    out: dict[str, bytes] = {}
    _run([*server.scp_argv(user), str(local / "up.bin"), server.remote(remote / "scp.bin")])
    out["scp up"] = (remote / "scp.bin").read_bytes()
    down = local / f"down-{server.port}.bin"
    _run([*server.scp_argv(user), server.remote(remote / "scp.bin"), str(down)])
    out["scp down"] = down.read_bytes()
    batch = local / "batch"  # its last command fails: the same error and status are expected
    batch.write_text(
        f"put {local / 'up.bin'} {remote}/sftp.bin\nls {remote}\nget {remote}/repo/x\n"
    )
    done = subprocess.run(
        [*server.sftp_argv(user), "-b", str(batch), server.host],
        capture_output=True,
        timeout=60,
        check=False,
    )
    out["sftp"] = done.stdout + b"|" + done.stderr + b"|" + bytes([done.returncode])
    out["sftp file"] = (remote / "sftp.bin").read_bytes()
    _run(
        [
            "rsync",
            "-a",
            "-e",
            server.ssh_command(user),
            f"{local}/tree/",
            server.remote(remote / "tree"),
        ]
    )
    out["rsync"] = (remote / "tree" / "d" / "f.bin").read_bytes()
    clone = local / f"clone-{server.port}"
    git_env = {**client_env(), "GIT_SSH_COMMAND": server.ssh_command(user)}
    _run(["git", "clone", "-q", server.remote(remote / "repo"), str(clone)], git_env)
    out["git"] = (clone / "hello.txt").read_bytes()
    (remote / "scp.bin").unlink()
    (remote / "sftp.bin").unlink()
    shutil.rmtree(remote / "tree")
    assert out["scp up"] == out["scp down"] == out["sftp file"] == out["rsync"] == blob
    return out


def _make_repo(repo: Path, user: UnixUser) -> None:
    env = {**client_env(), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    _run(["git", "init", "-q", "-b", "main", str(repo)], env)
    (repo / "hello.txt").write_text("hello over ssh\n")
    _run(["git", "-C", str(repo), "add", "hello.txt"], env)
    _run(["git", "-C", str(repo), "commit", "-q", "-m", "one"], env)
    for p in [repo, *repo.rglob("*")]:
        os.chown(p, user.uid, user.gid, follow_symlinks=False)


def test_scp_sftp_rsync_git_are_unchanged_and_recorded(
    agent: AgentFactory,
    sshd_server: SshdFactory,
    alice: UnixUser,
    scratch: Path,
    tmp_path: Path,
) -> None:
    a = agent(exec_capture_cap=CAP)
    plain, server = sshd_server(), recorded_server(sshd_server, a)
    (tmp_path / "up.bin").write_bytes(os.urandom(300_000))
    (tmp_path / "tree" / "d").mkdir(parents=True)
    shutil.copy(tmp_path / "up.bin", tmp_path / "tree" / "d" / "f.bin")
    _make_repo(scratch / "repo", alice)
    assert _transfers(server, alice, scratch, tmp_path) == _transfers(
        plain, alice, scratch, tmp_path
    )

    records = finished(a, 5)  # scp twice, sftp, rsync, git: one session each
    kinds = sorted((r["program_type"], (r["command"] or "").split()[0]) for r in records)
    assert kinds == [
        ("exec", "git-upload-pack"),
        ("exec", "rsync"),
        ("subsystem", SFTP_SERVER),
        ("subsystem", SFTP_SERVER),
        ("subsystem", SFTP_SERVER),
    ]
    for r in records:
        rec = read_recording(a, r)
        assert r["recording_status"] == "complete" and rec.sealed_to_the_end, r
        assert r["exit_status"] == 0 and r["unix_user"] == alice.name
        s = streams(r)
        assert set(s) == {"stdin", "stdout", "stderr"}
        for name, info in s.items():
            assert info["captured"] == min(CAP, info["bytes"]), (name, r)
            assert isinstance(info["sha256"], str) and len(info["sha256"]) == 64
        assert r["bytes_in"] == s["stdin"]["bytes"]
        assert r["spool"]["sealed_bytes"] < 40 * CAP  # capped content, not the transfer
    # each file transfer moved 300 kB one way: more than the cap, so counted past it
    uploads = [r for r in records if streams(r)["stdin"]["bytes"] > 300_000]
    downloads = [r for r in records if streams(r)["stdout"]["bytes"] > 300_000]
    assert (len(uploads), len(downloads)) == (3, 1)  # scp up, sftp put, rsync; scp down


def test_50_concurrent_sessions_leave_50_complete_recordings(
    agent: AgentFactory, sshd_server: SshdFactory, alice: UnixUser
) -> None:
    a = agent()
    server = recorded_server(sshd_server, a)
    procs = []
    for i in range(50):
        argv = [*server.ssh_argv(alice), "-T", server.host, f"echo session-{i}; echo e-{i} >&2"]
        procs.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=client_env(),
            )
        )
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=90)
        assert (proc.returncode, out, err) == (0, f"session-{i}\n".encode(), f"e-{i}\n".encode())
    records = finished(a, 50)
    seen = set()
    for r in records:
        rec = read_recording(a, r)
        assert r["recording_status"] == "complete" and rec.sealed_to_the_end, r
        i = int(r["command"].split()[1].removeprefix("session-").rstrip(";"))
        assert rec.output.count(f"session-{i}\n") == 1 and f"e-{i}\n" in rec.output
        seen.add(i)
    assert seen == set(range(50))
    assert len({r["spool"]["priv_pid"] for r in records}) == 50  # 50 SSH connections
    time.sleep(1.5)  # the PAM sessions close: none of them may turn up unrecorded
    assert len(a.records()) == 50
