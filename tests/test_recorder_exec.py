"""The non-pty exec relay (agent/relay_exec.py) on real pipes, without sshd or a daemon.

A socketpair stands in for the daemon link; what the relay sends is decoded with
agent/protocol.py's Decoder. The relay runs on the main thread (signal.set_wakeup_fd needs
it); helper threads play sshd's side (feed our stdin, drain our stdout/stderr).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from sshaudit.agent import protocol
from sshaudit.agent.relay_common import RelayResult, Sink
from sshaudit.agent.relay_exec import ExecPolicy, StdFds, run_exec

SH = "/bin/sh"


def _drain(fd: int, sink: bytearray) -> None:
    while chunk := os.read(fd, 1 << 16):
        sink += chunk
    os.close(fd)


def _feed(fd: int, data: bytes, close: bool) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass
    finally:
        if close:
            os.close(fd)


@dataclass
class Daemon:
    """The daemon's end of the socketpair: everything received, decoded."""

    sock: socket.socket
    raw: bytearray = field(default_factory=bytearray)

    def run(self) -> None:
        while chunk := self.sock.recv(1 << 16):
            self.raw += chunk

    def messages(self) -> list[protocol.Message]:
        decoder = protocol.Decoder()
        msgs = decoder.feed(bytes(self.raw))
        assert decoder.pending == 0
        return msgs

    def data(self, stream: protocol.Stream) -> bytes:
        parts = [protocol.parse_data(m.payload) for m in self.messages()]
        return b"".join(d.data for d in parts if d.stream is stream)


@dataclass
class Run:
    result: RelayResult
    out: bytes
    err: bytes
    daemon: Daemon


def relay(
    command: str,
    stdin: bytes = b"",
    *,
    policy: ExecPolicy | None = None,
    close_stdin: bool = True,
    end_on_loss: bool = False,
    during: object = None,
) -> Run:
    """Run ``sh -c command`` through run_exec with ``stdin`` fed, as sshd would."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ours, theirs = socket.socketpair()
    daemon = Daemon(theirs)
    out, err = bytearray(), bytearray()
    threads = [
        threading.Thread(target=_feed, args=(in_w, stdin, close_stdin), daemon=True),
        threading.Thread(target=_drain, args=(out_r, out), daemon=True),
        threading.Thread(target=_drain, args=(err_r, err), daemon=True),
        threading.Thread(target=daemon.run, daemon=True),
    ]
    if callable(during):
        threads.append(threading.Thread(target=during, args=(ours, theirs), daemon=True))
    for t in threads:
        t.start()
    start = time.monotonic()
    sink = Sink(ours.sendall, watch=ours, end_on_loss=end_on_loss)
    try:
        result = run_exec(
            SH,
            [SH, "-c", command],
            {"PATH": os.environ["PATH"]},
            sink=sink,
            clock=lambda: time.monotonic() - start,
            policy=policy or ExecPolicy(),
            fds=StdFds(in_r, out_w, err_w),
        )
    finally:
        ours.close()
        os.close(in_r)  # unblocks a feeder the child never read
    for t in threads[1:]:
        t.join(30)
    theirs.close()
    if not close_stdin:
        os.close(in_w)
    return Run(result, bytes(out), bytes(err), daemon)


def test_exit_codes_and_separate_streams() -> None:
    ok = relay("echo out; echo err >&2")
    assert ok.result.status.exit_status == 0 and ok.result.status.signal is None
    assert (ok.out, ok.err) == (b"out\n", b"err\n")
    assert ok.daemon.data(protocol.Stream.OUTPUT) == b"out\n"
    assert ok.daemon.data(protocol.Stream.ERROR) == b"err\n"
    three = relay("exit 3")
    assert three.result.status.exit_status == 3


def test_death_by_signal_is_reported_as_the_signal() -> None:
    run = relay("kill -TERM $$; sleep 5")
    assert run.result.status.signal == signal.SIGTERM
    assert run.result.status.exit_status is None


def test_binary_data_intact_with_cap_and_sha256() -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    cap = 100_000
    run = relay("cat; cat /dev/null >&2", data, policy=ExecPolicy(capture_cap=cap))
    assert run.out == data
    digest = hashlib.sha256(data).hexdigest()
    streams = run.result.streams
    for name in ("stdin", "stdout"):
        assert (streams[name].bytes, streams[name].captured) == (len(data), cap)
        assert streams[name].sha256 == digest
    assert streams["stderr"].bytes == 0
    assert streams["stderr"].sha256 == hashlib.sha256(b"").hexdigest()
    assert run.daemon.data(protocol.Stream.INPUT) == data[:cap]
    assert run.daemon.data(protocol.Stream.OUTPUT) == data[:cap]


def test_past_the_cap_without_hashing_bytes_still_flow() -> None:
    data = os.urandom(2 * 1024 * 1024)
    run = relay("cat", data, policy=ExecPolicy(capture_cap=0, hash=False))
    assert run.out == data
    assert run.result.streams["stdout"].bytes == len(data)
    assert run.result.streams["stdout"].sha256 is None
    assert run.daemon.messages() == []


def test_stdin_eof_reaches_the_child() -> None:
    run = relay("cat; echo after-eof", b"line\n")
    assert run.out == b"line\nafter-eof\n"


def test_record_input_off_sends_no_input_data() -> None:
    run = relay("cat", b"secret-input", policy=ExecPolicy(record_input=False))
    assert run.out == b"secret-input"
    assert run.daemon.data(protocol.Stream.INPUT) == b""
    assert b"secret-input" in run.daemon.data(protocol.Stream.OUTPUT)
    assert run.result.streams["stdin"].bytes == len(b"secret-input")


def test_child_that_never_reads_stdin_cannot_deadlock() -> None:
    # 4 MB in, 4 MB out, stdin never read: a blocking relay would hang here.
    run = relay(
        "head -c 4000000 /dev/zero", os.urandom(4_000_000), policy=ExecPolicy(capture_cap=0)
    )
    assert run.out == bytes(4_000_000)
    assert run.result.status.exit_status == 0


def test_background_job_holding_stdout_keeps_the_session_like_sshd() -> None:
    t0 = time.monotonic()
    run = relay("(sleep 0.5; echo late) & echo early")
    assert run.out == b"early\nlate\n"
    assert time.monotonic() - t0 >= 0.5


def test_signal_to_the_recorder_is_forwarded_to_the_child() -> None:
    def send_term(_ours: socket.socket, _theirs: socket.socket) -> None:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)

    run = relay("exec sleep 20", during=send_term)
    assert run.result.status.signal == signal.SIGTERM


def test_daemon_lost_with_deny_ends_the_session() -> None:
    def lose(_ours: socket.socket, theirs: socket.socket) -> None:
        time.sleep(0.3)
        theirs.shutdown(socket.SHUT_RDWR)

    t0 = time.monotonic()
    run = relay("echo started; sleep 20", end_on_loss=True, during=lose)
    assert time.monotonic() - t0 < 10
    assert run.result.status.signal == signal.SIGHUP
    assert run.result.error == "recording service lost"
    assert b"recording service is unavailable" in run.err


def test_daemon_lost_with_allow_continues_unrecorded() -> None:
    def lose(_ours: socket.socket, theirs: socket.socket) -> None:
        time.sleep(0.2)
        theirs.shutdown(socket.SHUT_RDWR)

    run = relay("sleep 0.6; echo finished", end_on_loss=False, during=lose)
    assert run.out == b"finished\n"
    assert run.result.status.exit_status == 0
    assert run.result.error == "recording service lost"


def test_program_that_cannot_run_fails_like_sshd() -> None:
    in_r, in_w = os.pipe()
    err_r, err_w = os.pipe()
    result = run_exec(
        "/nonexistent/shell",
        ["x"],
        {},
        sink=Sink(None),
        clock=time.monotonic,
        policy=ExecPolicy(),
        fds=StdFds(in_r, 1, err_w),
    )
    os.close(err_w)
    message = os.read(err_r, 1000)
    for fd in (in_r, in_w, err_r):
        os.close(fd)
    assert result.status.exit_status == 1
    assert b"/nonexistent/shell: No such file or directory" in message


@pytest.fixture(autouse=True)
def _no_fd_leaks() -> Iterator[None]:
    before = set(os.listdir("/proc/self/fd"))
    yield
    leaked = set(os.listdir("/proc/self/fd")) - before
    assert not leaked, f"file descriptors leaked: {leaked}"
