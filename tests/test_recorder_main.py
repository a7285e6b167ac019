"""The recorder's entry point (agent/record.py): decisions, the daemon conversation, policy.

Pure decisions are tested in-process; ``main`` is tested as sshd runs it, through the
launcher in a subprocess, against either no daemon (a socket path that does not exist) or
a scripted stand-in listening on a Unix socket (this is the recorder's unit test; the real
daemon is exercised by the end-to-end tests).
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import sshaudit
from sshaudit.agent import protocol
from sshaudit.agent.launcher import write_launcher
from sshaudit.agent.record import (
    HELP,
    UNAVAILABLE,
    Accept,
    ProgramType,
    Refuse,
    map_subsystem,
    parse_args,
    parse_reply,
    plan_session,
)
from sshaudit.agent.recorder_config import DownPolicy, parse
from sshaudit.errors import ConfigError, UsageError

PACKAGE_PARENT = str(Path(sshaudit.__file__).parent.parent)  # not resolved: the link tree
ME = pwd.getpwuid(os.getuid()).pw_name


# -- pure decisions ----------------------------------------------------------------------


def test_parse_args() -> None:
    assert parse_args([]) == "/etc/sshaudit/agent.toml"
    assert parse_args(["--config", "/x.toml"]) == "/x.toml"
    assert parse_args(["--config=/y.toml"]) == "/y.toml"
    assert parse_args(["--config", "/x.toml", "--help"]) is None
    for bad in (["--bogus"], ["--config"], ["--config="], ["extra"]):
        with pytest.raises(UsageError):
            parse_args(bad)


def test_config_reader_defaults_and_errors() -> None:
    cfg = parse("")
    assert (cfg.socket, cfg.on_daemon_down) == ("/run/sshaudit/agent.sock", DownPolicy.DENY)
    cfg = parse(
        'socket = "/s"\n[policy]\non_daemon_down = "allow"\n'
        'break_glass_users = ["ops"]\nrecord_input = false\n'
    )
    assert cfg.socket == "/s" and cfg.on_daemon_down is DownPolicy.ALLOW
    assert cfg.break_glass_users == frozenset({"ops"})
    assert parse('[policy]\nbreak_glass_users = ["ops"]').may_run_unrecorded("ops")
    assert not parse('[policy]\nbreak_glass_users = ["ops"]').may_run_unrecorded("eve")
    for bad in (
        '[policy]\non_daemon_down = "Allow"',
        "socket = 3",
        'socket = "rel/path"',
        "policy = 1",
        '[policy]\nbreak_glass_users = "ops"',
        "not toml [",
    ):
        with pytest.raises(ConfigError):
            parse(bad)


def test_internal_sftp_maps_to_the_sftp_server_program() -> None:
    debian = {"/usr/lib/openssh/sftp-server"}
    rhel = {"/usr/libexec/openssh/sftp-server"}
    assert map_subsystem("internal-sftp", debian.__contains__) == "/usr/lib/openssh/sftp-server"
    assert (
        map_subsystem("internal-sftp -l INFO -u 022", rhel.__contains__)
        == "/usr/libexec/openssh/sftp-server -l INFO -u 022"
    )
    assert (
        map_subsystem("/usr/lib/openssh/sftp-server -e", debian.__contains__)
        == "/usr/lib/openssh/sftp-server -e"
    )
    assert map_subsystem("ls -l", debian.__contains__) is None
    assert map_subsystem("internal-sftpx", debian.__contains__) is None
    with pytest.raises(UsageError):
        map_subsystem("internal-sftp", set().__contains__)


def test_plan_session_runs_what_sshd_would() -> None:
    shell = plan_session({}, "u", "/bin/bash", pty=True)
    assert (shell.program_type, shell.path, shell.argv) == (
        ProgramType.SHELL,
        "/bin/bash",
        ("-bash",),
    )
    exe = plan_session({"SSH_ORIGINAL_COMMAND": "echo 'a b'"}, "u", "/bin/zsh", pty=False)
    assert (exe.program_type, exe.argv) == (ProgramType.EXEC, ("zsh", "-c", "echo 'a b'"))
    sub = plan_session(
        {"SSH_ORIGINAL_COMMAND": "internal-sftp"},
        "u",
        "/bin/sh",
        pty=False,
        exists={"/usr/lib/openssh/sftp-server"}.__contains__,
    )
    assert sub.program_type is ProgramType.SUBSYSTEM and sub.command == "internal-sftp"
    assert sub.argv == ("sh", "-c", "/usr/lib/openssh/sftp-server")


def _msg(t: protocol.MsgType, doc: object) -> protocol.Message:
    return protocol.Message(t, json.dumps(doc).encode())


def test_parse_reply_validates_the_daemon() -> None:
    ok = {"session_id": "s1", "record_input": True, "exec_capture_cap": 10, "exec_hash": False}
    assert parse_reply(_msg(protocol.MsgType.ACCEPT, ok)) == Accept("s1", True, 10, False)
    refuse = parse_reply(_msg(protocol.MsgType.REFUSE, {"reason": "spool\x1b[2J full\n"}))
    assert refuse == Refuse("spool [2J full")
    for bad in (
        {**ok, "exec_capture_cap": -1},
        {**ok, "exec_capture_cap": True},
        {**ok, "session_id": ""},
        {**ok, "record_input": "yes"},
    ):
        with pytest.raises(protocol.ProtocolError):
            parse_reply(_msg(protocol.MsgType.ACCEPT, bad))
    with pytest.raises(protocol.ProtocolError):
        parse_reply(_msg(protocol.MsgType.DONE, {}))


# -- main, as sshd runs it ---------------------------------------------------------------


@dataclass
class StandIn:
    """A scripted daemon on a Unix socket: answers HELLO with ``reply``, END with DONE."""

    path: str
    reply: tuple[protocol.MsgType, dict[str, object]] | None
    messages: list[protocol.Message] = field(default_factory=list)

    def serve(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            decoder = protocol.Decoder()
            while chunk := conn.recv(1 << 16):
                for msg in decoder.feed(chunk):
                    self.messages.append(msg)
                    if msg.type is protocol.MsgType.HELLO and self.reply is not None:
                        conn.sendall(protocol.encode_json(*self.reply))
                    elif msg.type is protocol.MsgType.END:
                        conn.sendall(protocol.encode_json(protocol.MsgType.DONE, {}))

    def of_type(self, t: protocol.MsgType) -> list[protocol.Message]:
        return [m for m in self.messages if m.type is t]


ACCEPT = (
    protocol.MsgType.ACCEPT,
    {"session_id": "abc", "record_input": True, "exec_capture_cap": 1 << 20, "exec_hash": True},
)


@pytest.fixture
def launcher(tmp_path: Path) -> Path:
    path = tmp_path / "record"
    write_launcher(str(path), sys.executable, PACKAGE_PARENT)
    return path


@pytest.fixture
def stand_in(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StandIn]:
    reply = getattr(request, "param", ACCEPT)
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    daemon = StandIn(path, reply)
    thread = threading.Thread(target=daemon.serve, args=(listener,), daemon=True)
    thread.start()
    yield daemon
    listener.close()
    thread.join(5)


def run_recorder(
    launcher: Path,
    tmp_path: Path,
    *,
    socket_path: str,
    command: str | None,
    policy: str = "",
    stdin: bytes = b"",
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    config = tmp_path / "agent.toml"
    config.write_text(f'socket = "{socket_path}"\n[policy]\n{policy}\n')
    env = {
        "PATH": os.environ["PATH"],
        "SSH_CONNECTION": "10.0.0.1 5555 10.0.0.2 22",
        **(extra_env or {}),
    }
    if command is not None:
        env["SSH_ORIGINAL_COMMAND"] = command
    return subprocess.run(
        [str(launcher), "--config", str(config)],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )


def test_help_and_bad_arguments(launcher: Path) -> None:
    done = subprocess.run([str(launcher), "--help"], capture_output=True, timeout=30)
    assert done.returncode == 0 and done.stdout.decode() == HELP
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS"):
        assert f"\n{section}\n" in "\n" + HELP
    bad = subprocess.run([str(launcher), "--frobnicate"], capture_output=True, timeout=30)
    assert bad.returncode == 2 and b"--frobnicate" in bad.stderr


def test_missing_config_refuses(launcher: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(launcher), "--config", str(tmp_path / "none.toml")],
        capture_output=True,
        timeout=30,
        env={"SSH_ORIGINAL_COMMAND": "true"},
    )
    assert done.returncode == 1 and done.stderr.startswith(b"sshaudit: session refused: ")


def test_daemon_down_deny_refuses_without_running(launcher: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    done = run_recorder(
        launcher, tmp_path, socket_path=str(tmp_path / "no.sock"), command=f"touch {marker}"
    )
    assert done.returncode == 1
    assert done.stderr == (UNAVAILABLE + "\n").encode()
    assert not marker.exists()


def test_daemon_down_allow_runs_unrecorded(launcher: Path, tmp_path: Path) -> None:
    done = run_recorder(
        launcher,
        tmp_path,
        socket_path=str(tmp_path / "no.sock"),
        command="cat; echo err >&2; exit 3",
        policy='on_daemon_down = "allow"',
        stdin=b"in\x00put",
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, b"in\x00put", b"err\n")


def test_break_glass_user_runs_when_the_daemon_is_down(launcher: Path, tmp_path: Path) -> None:
    done = run_recorder(
        launcher,
        tmp_path,
        socket_path=str(tmp_path / "no.sock"),
        command="echo ok",
        policy=f'break_glass_users = ["{ME}"]',
    )
    assert (done.returncode, done.stdout) == (0, b"ok\n")
    other = run_recorder(
        launcher,
        tmp_path,
        socket_path=str(tmp_path / "no.sock"),
        command="echo ok",
        policy='break_glass_users = ["someone-else"]',
    )
    assert other.returncode == 1 and other.stdout == b""


def test_recorded_exec_session(launcher: Path, tmp_path: Path, stand_in: StandIn) -> None:
    auth = tmp_path / "auth"
    auth.write_text("publickey ssh-ed25519 AAAAtest\n")
    done = run_recorder(
        launcher,
        tmp_path,
        socket_path=stand_in.path,
        stdin=b"abc",
        command="cat; echo 'ü \"q\"'; exit 3",
        extra_env={"SSH_USER_AUTH": str(auth)},
    )
    assert (done.returncode, done.stdout) == (3, 'abcü "q"\n'.encode())
    hello = stand_in.of_type(protocol.MsgType.HELLO)[0].json()
    assert hello["program_type"] == "exec" and hello["command"] == "cat; echo 'ü \"q\"'; exit 3"
    assert hello["ssh_user_auth"] == "publickey ssh-ed25519 AAAAtest\n"
    assert hello["ssh_connection"] == "10.0.0.1 5555 10.0.0.2 22"
    assert (hello["pty"], hello["tty"], hello["shell"]) == (
        False,
        None,
        pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh",
    )
    datas = [protocol.parse_data(m.payload) for m in stand_in.of_type(protocol.MsgType.DATA)]
    assert b"".join(d.data for d in datas if d.stream is protocol.Stream.INPUT) == b"abc"
    end = stand_in.of_type(protocol.MsgType.END)[0].json()
    assert (end["exit_status"], end["signal"], end["bytes_in"]) == (3, None, 3)
    assert end["streams"]["stdout"]["bytes"] == len(done.stdout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_recorded_session_dies_by_the_childs_signal(
    launcher: Path, tmp_path: Path, stand_in: StandIn, sig: int
) -> None:
    done = run_recorder(launcher, tmp_path, socket_path=stand_in.path, command=f"kill -{sig} $$")
    assert done.returncode == -sig, done.stderr  # sshd then reports exit-signal
    assert not list(tmp_path.glob("core*"))
    end = stand_in.of_type(protocol.MsgType.END)[0].json()
    assert (end["exit_status"], end["signal"]) == (None, sig)


@pytest.mark.parametrize(
    "stand_in", [(protocol.MsgType.REFUSE, {"reason": "spool full"})], indirect=True
)
def test_refused_by_the_daemon(launcher: Path, tmp_path: Path, stand_in: StandIn) -> None:
    done = run_recorder(launcher, tmp_path, socket_path=stand_in.path, command="echo ran")
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr == b"sshaudit: session refused: spool full\n"


@pytest.mark.parametrize(
    "stand_in", [(protocol.MsgType.REFUSE, {"reason": "spool full"})], indirect=True
)
def test_break_glass_user_runs_when_refused(
    launcher: Path, tmp_path: Path, stand_in: StandIn
) -> None:
    done = run_recorder(
        launcher,
        tmp_path,
        socket_path=stand_in.path,
        command="echo ran",
        policy=f'break_glass_users = ["{ME}"]',
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"ran\n", b"")


@pytest.mark.parametrize("stand_in", [None], indirect=True)
def test_silent_daemon_times_out_into_the_policy(
    launcher: Path, tmp_path: Path, stand_in: StandIn
) -> None:
    t0 = time.monotonic()
    done = run_recorder(
        launcher,
        tmp_path,
        socket_path=stand_in.path,
        command="echo ran",
        policy="handshake_timeout = 2.0",
    )
    assert done.returncode == 1 and done.stderr == (UNAVAILABLE + "\n").encode()
    assert 1.5 < time.monotonic() - t0 < 10


def test_subsystem_is_announced_as_such(launcher: Path, tmp_path: Path, stand_in: StandIn) -> None:
    if not any(
        Path(p).exists()
        for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
    ):
        pytest.skip("NO SFTP-SERVER PROGRAM: install openssh-sftp-server")
    done = run_recorder(launcher, tmp_path, socket_path=stand_in.path, command="internal-sftp")
    assert done.returncode == 0  # sftp-server ends at EOF on its input
    hello = stand_in.of_type(protocol.MsgType.HELLO)[0].json()
    assert (hello["program_type"], hello["command"]) == ("subsystem", "internal-sftp")


def test_import_time_of_the_launcher(launcher: Path) -> None:
    """Measured, not asserted: what the recorder costs at start (DESIGN.md performance)."""
    cmd = [sys.executable, "-I", "-S", "-X", "importtime", str(launcher), "--help"]
    done = subprocess.run(cmd, capture_output=True, timeout=30, check=True)
    lines = [x for x in done.stderr.decode().splitlines() if x.startswith("import time:")]
    total = sum(int(x.split("|")[1]) for x in lines[1:] if not x.split("|")[2].startswith("  "))
    heavy = [x for x in lines if any(m in x for m in ("pydantic", "cryptography", "psutil"))]
    assert heavy == []  # a hard rule (issue3.md), not a measurement
    t0 = time.perf_counter()
    for _ in range(10):
        subprocess.run([str(launcher), "--help"], capture_output=True, timeout=30, check=True)
    wall = (time.perf_counter() - t0) / 10
    print(
        f"\nrecorder imports: {total / 1000:.1f} ms (-X importtime, top level); "
        f"launcher --help wall time: {wall * 1000:.1f} ms"
    )
