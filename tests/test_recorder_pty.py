"""The pty relay (agent/relay_pty.py) with real ptys, without sshd or a daemon.

The test plays the user's terminal: it holds the master of an "outer" pty whose slave is
what sshd would have given the recorder; a socketpair stands in for the daemon and is
decoded with agent/protocol.py. The relay runs on the main thread; a helper thread types.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import signal
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from sshaudit.agent import protocol
from sshaudit.agent.relay_common import RelayResult, Sink
from sshaudit.agent.relay_pty import PtyFds, run_pty

PASSWORD = b"hunter2-Zq9"


class Terminal:
    """The user's side of the outer pty: a reader thread collects the screen; type keys."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.output = bytearray()
        self.stop = threading.Event()
        self.lose_daemon: Callable[[], None] = lambda: None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(self.master, 1 << 16)
                except OSError:
                    return
                self.output += chunk

    def wait_for(self, pattern: bytes, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, bytes(self.output)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen; got {bytes(self.output)!r}")
            time.sleep(0.02)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        time.sleep(0.1)  # the last output is in flight on the outer pty
        self.stop.set()
        self.reader.join(5)


@dataclass
class Recorded:
    result: RelayResult
    raw: bytearray = field(default_factory=bytearray)
    screen: bytes = b""

    def messages(self) -> list[protocol.Message]:
        return protocol.Decoder().feed(bytes(self.raw))

    def data(self, stream: protocol.Stream) -> bytes:
        msgs = [m for m in self.messages() if m.type is protocol.MsgType.DATA]
        return b"".join(
            d.data
            for d in map(protocol.parse_data, (m.payload for m in msgs))
            if d.stream is stream
        )

    def all_data(self) -> bytes:
        return b"".join(
            protocol.parse_data(m.payload).data
            for m in self.messages()
            if m.type is protocol.MsgType.DATA
        )

    def of_type(self, t: protocol.MsgType) -> list[protocol.Message]:
        return [m for m in self.messages() if m.type is t]


def session(
    argv: list[str],
    user: Callable[[Terminal], None],
    *,
    record_input: bool = True,
    env: dict[str, str] | None = None,
    end_on_loss: bool = False,
) -> Recorded:
    """Run ``argv`` through run_pty on an outer pty driven by ``user`` (in a thread)."""
    outer_master, outer_slave = os.openpty()
    fcntl.ioctl(outer_slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    modes_before = termios.tcgetattr(outer_slave)
    ours, theirs = socket.socketpair()
    raw = bytearray()
    term = Terminal(outer_master)
    term.lose_daemon = lambda: theirs.shutdown(socket.SHUT_RDWR)

    def daemon() -> None:
        while chunk := theirs.recv(1 << 16):
            raw.extend(chunk)

    failure: list[BaseException] = []

    def drive() -> None:
        try:
            user(term)
        except BaseException as exc:
            failure.append(exc)
            os.write(outer_master, b"\x04exit 99\r")

    threads = [threading.Thread(target=f, daemon=True) for f in (daemon, drive)]
    for t in threads:
        t.start()
    start = time.monotonic()
    base_env = {"PATH": os.environ["PATH"], "TERM": "xterm", "PS1": "$ ", "HOME": "/"}
    try:
        result = run_pty(
            argv[0],
            argv,
            {**base_env, **(env or {})},
            sink=Sink(ours.sendall, watch=ours, end_on_loss=end_on_loss),
            clock=lambda: time.monotonic() - start,
            record_input=record_input,
            fds=PtyFds(outer_slave, outer_slave),
        )
        assert termios.tcgetattr(outer_slave) == modes_before, "outer tty modes not restored"
    finally:
        ours.close()
        threads[1].join(10)
        threads[0].join(10)
        term.close()
        for fd in (outer_master, outer_slave):
            os.close(fd)
        theirs.close()
    if failure:
        raise failure[0]
    return Recorded(result, raw, bytes(term.output))


def test_shell_session_output_input_resize_and_exit_status() -> None:
    def user(t: Terminal) -> None:
        t.wait_for(rb"\$ ")
        t.type(b"echo hel''lo\r")
        t.wait_for(b"hello\r\n")
        fcntl.ioctl(t.master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        os.kill(os.getpid(), signal.SIGWINCH)  # the kernel signals only a tty's own session
        t.type(b"stty size\r")
        t.wait_for(b"33 101")
        t.type(b"exit 5\r")

    rec = session(["/bin/sh"], user)
    assert rec.result.status.exit_status == 5
    assert b"echo hel''lo\r" in rec.data(protocol.Stream.INPUT)
    assert b"hello\r\n" in rec.data(protocol.Stream.OUTPUT)
    assert b"33 101" in rec.screen
    resizes = [protocol.parse_resize(m.payload) for m in rec.of_type(protocol.MsgType.RESIZE)]
    assert [(r.cols, r.rows) for r in resizes] == [(101, 33)]
    assert rec.result.streams["stdout"].bytes == len(rec.data(protocol.Stream.OUTPUT))


def _type_password(t: Terminal, prompt: bytes) -> None:
    t.wait_for(prompt)
    time.sleep(0.2)  # let the reader settle in its read(2) with echo off
    for key in PASSWORD:  # one keystroke at a time, as a person types
        t.type(bytes([key]))
        time.sleep(0.005)
    t.type(b"\r")


def test_input_with_echo_off_becomes_a_marker() -> None:
    def user(t: Terminal) -> None:
        t.wait_for(rb"\$ ")
        t.type(b"stty -echo; printf PW:; read pw; stty echo; echo len=${#pw}\r")
        _type_password(t, b"PW:")
        t.wait_for(b"len=11")
        t.type(b"exit\r")

    rec = session(["/bin/sh"], user)
    assert rec.result.status.exit_status == 0
    assert PASSWORD not in rec.all_data()
    assert PASSWORD[:3] not in rec.data(protocol.Stream.INPUT)
    labels = [protocol.parse_marker(m.payload).label for m in rec.of_type(protocol.MsgType.MARKER)]
    assert labels and all(x.startswith("input hidden (echo off): ") for x in labels)
    hidden = sum(int(x.rsplit(": ", 1)[1].split()[0]) for x in labels)
    assert hidden == len(PASSWORD) + 1  # the keys and the Enter
    assert rec.result.streams["stdin"].captured < rec.result.streams["stdin"].bytes


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_read_s_password_is_not_recorded() -> None:
    def user(t: Terminal) -> None:
        t.wait_for(rb"\$ ")
        t.type(b"read -s -p PW: pw; echo; echo len=${#pw}\r")
        _type_password(t, b"PW:")
        t.wait_for(b"len=11")
        t.type(b"exit 0\r")

    bash = shutil.which("bash") or "bash"
    rec = session([bash, "--norc", "--noprofile", "-i"], user)
    assert rec.result.status.exit_status == 0
    assert PASSWORD not in rec.all_data()
    assert rec.of_type(protocol.MsgType.MARKER)


def test_record_input_off_records_no_input_at_all() -> None:
    def user(t: Terminal) -> None:
        t.wait_for(rb"\$ ")
        t.type(b"echo typed-text\r")
        t.wait_for(b"typed-text\r\n")
        t.type(b"exit\r")

    rec = session(["/bin/sh"], user, record_input=False)
    assert rec.data(protocol.Stream.INPUT) == b""
    assert rec.of_type(protocol.MsgType.MARKER) == []
    assert b"typed-text" in rec.data(protocol.Stream.OUTPUT)  # the echo is output


def test_exec_with_pty_and_last_output_not_lost() -> None:
    rec = session(["/bin/sh", "-c", "tty; seq 1 20000; exit 4"], lambda t: None)
    assert rec.result.status.exit_status == 4
    out = rec.data(protocol.Stream.OUTPUT)
    assert out.startswith(b"/dev/pts/") and out.endswith(b"19999\r\n20000\r\n")
    assert rec.screen.endswith(b"20000\r\n")


def test_shell_killed_by_signal() -> None:
    def user(t: Terminal) -> None:
        t.wait_for(rb"\$ ")
        t.type(b"kill -KILL $$\r")

    rec = session(["/bin/sh"], user)
    assert rec.result.status.signal == signal.SIGKILL


def test_child_has_the_new_pty_as_controlling_terminal_and_the_window_size() -> None:
    rec = session(["/bin/sh", "-c", "stty size; ps -o tty= -p $$; tty"], lambda t: None)
    out = rec.data(protocol.Stream.OUTPUT).decode()
    assert out.startswith("24 80\r\n")
    tty = out.split()[-1].removeprefix("/dev/")
    assert out.split()[2] == tty  # ps: the controlling terminal is the new pty


def test_daemon_lost_with_deny_hangs_up_the_session() -> None:
    def user(t: Terminal) -> None:
        t.wait_for(rb"\$ ")
        t.lose_daemon()
        t.wait_for(b"recording service is unavailable")

    t0 = time.monotonic()
    rec = session(["/bin/sh"], user, end_on_loss=True)
    assert time.monotonic() - t0 < 10
    assert rec.result.status.signal == signal.SIGHUP
    assert rec.result.error == "recording service lost"


def test_daemon_lost_with_allow_continues() -> None:
    def user(t: Terminal) -> None:
        t.wait_for(rb"\$ ")
        t.lose_daemon()
        time.sleep(0.2)
        t.type(b"echo still-here\r")
        t.wait_for(b"still-here\r\n")
        t.type(b"exit 2\r")

    rec = session(["/bin/sh"], user, end_on_loss=False)
    assert rec.result.status.exit_status == 2
    assert rec.result.error == "recording service lost"
    assert b"still-here" in rec.screen


@pytest.fixture(autouse=True)
def _no_fd_leaks() -> Iterator[None]:
    before = set(os.listdir("/proc/self/fd"))
    yield
    leaked = set(os.listdir("/proc/self/fd")) - before
    assert not leaked, f"file descriptors leaked: {leaked}"
