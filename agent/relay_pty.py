"""Relay of a pty session: the user's shell (or ``$SHELL -c cmd``) on a fresh pty.

sshd gave the recorder a pty (the "outer" terminal, our stdin/stdout); the child gets a new
one (the "inner" pty) and we copy bytes between them, recording both directions:

- the inner pty starts with the outer one's termios and window size, so keys (erase, intr)
  and the screen behave as sshd set them from the client's request (RFC 4254 6.2);
  the outer terminal is put in raw mode, so line discipline happens once, on the inner
  pty, and it is restored on every way out;
- SIGWINCH on the outer terminal -> TIOCSWINSZ on the inner master (the kernel then
  signals the child's foreground job, tty_ioctl(4)) and a RESIZE message;
- input read while the inner terminal has ECHO off in canonical mode (passwords at
  ``read -s``, sudo, passwd, ssh) is never recorded: a MARKER with its length instead
  (termios is read from the master, which on Linux reports the slave's settings); a
  program that reads raw keys with echo off (a line editor) echoes them itself, so its
  input is recorded;
- the master is non-blocking: a child that stops reading input can never stall its
  output (the classic relay deadlock); writes to the outer terminal block (flow control);
- 64 KiB reads, one poll loop, no busy waits; on the child's exit the remaining output is
  drained until the slave side reports EIO/HUP, so the last lines are never lost.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import tty

from sshaudit.agent.protocol import Frozen, Stream, encode_data, encode_marker, encode_resize
from sshaudit.agent.relay_common import (
    FORWARDED_SIGNALS,
    LOST_MESSAGE,
    ChildStatus,
    Poller,
    RelayResult,
    SignalPipe,
    Sink,
    StreamStats,
    is_hangup,
    reap,
    say,
    try_write,
    write_all,
)

# typing costs start time at every login: it is imported for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Mapping, Sequence
    from typing import Any

    from sshaudit.agent.relay_common import Clock
else:
    import _signal as signal  # not signal: see relay_common (enum at every login)

READ_SIZE = 64 * 1024
DRAIN_IDLE = 0.25  # seconds without output after the child's exit before giving up on EIO
DRAIN_MAX = 2.0  # seconds of output relayed at most after the child's exit
KILL_GRACE = 2.0
_POLLIN = 0x001
_POLLOUT = 0x004
_WINSZ = struct.Struct("HHHH")  # struct winsize: rows, cols, xpixel, ypixel


class PtyFds(Frozen):
    """The user's side: the outer terminal sshd allocated (``stdin`` may equal ``stdout``)."""

    __slots__ = ("stdin", "stdout")
    stdin: int
    stdout: int

    def __init__(self, stdin: int = 0, stdout: int = 1) -> None:
        super().__init__(stdin, stdout)


SSHD_PTY = PtyFds()  # what sshd gave the recorder: fds 0 and 1


def get_winsize(fd: int) -> tuple[int, int] | None:
    """(cols, rows) of a terminal, or None when ``fd`` is not one."""
    try:
        rows, cols, _x, _y = _WINSZ.unpack(fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    except OSError:
        return None
    return cols, rows


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSZ.pack(rows, cols, 0, 0))


def _spawn(
    path: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    slave: int,
    master: int,
    handled: Sequence[int],
) -> int:
    """fork + exec with ``slave`` as the controlling terminal of a new session."""
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: only async-safe work, then exec; never returns into the caller
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.close(slave)
        os.close(master)
        for sig in (*handled, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.execve(path, list(argv), dict(env))  # noqa: S606 (the user's own shell)
    except OSError as exc:
        os.write(2, f"{path}: {exc.strerror}\r\n".encode(errors="replace"))
    finally:
        os._exit(1)  # sshd's child exits 1 when the shell cannot be run


class _State:
    """Counters and flags of one pty relay."""

    def __init__(self, sink: Sink, clock: Clock, record_input: bool) -> None:
        self.sink, self.clock, self.record_input = sink, clock, record_input
        self.bytes_in = self.bytes_out = self.captured_in = self.captured_out = 0
        self.pending = b""  # input the inner master did not take yet
        self.input_open = True
        self.output_open = True  # the outer terminal still takes output

    def on_input(self, master: int, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.record_input and self.sink.active:
            try:
                lflag = termios.tcgetattr(master)[3]
                # A password prompt (read -s, sudo, passwd, ssh) turns ECHO off and keeps
                # the canonical line discipline (ICANON). Line editors (bash's readline,
                # vim, less) turn both off and echo the keys themselves: hiding their
                # input would hide every command typed at a shell prompt.
                hidden = not lflag & termios.ECHO and bool(lflag & termios.ICANON)
            except termios.error:
                hidden = True  # cannot tell: never risk a password in clear
            if not hidden:
                self.captured_in += len(data)
                self.sink.emit(encode_data(self.clock(), Stream.INPUT, data))
            else:
                label = f"input hidden (echo off): {len(data)} bytes"
                self.sink.emit(encode_marker(self.clock(), label))
        self.pending += data


def run_pty(
    path: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    sink: Sink,
    clock: Clock,
    record_input: bool,
    fds: PtyFds = SSHD_PTY,
) -> RelayResult:
    """Run ``path`` with ``argv`` on a new pty relayed to the terminal on ``fds``."""
    master, slave = os.openpty()
    saved: list[Any] | None = None
    try:
        try:
            outer = termios.tcgetattr(fds.stdin)
            termios.tcsetattr(slave, termios.TCSANOW, outer)
            saved = outer
        except termios.error:
            pass  # not a terminal (tests, odd clients): the pty's defaults
        size = get_winsize(fds.stdin)
        if size is not None:
            _set_winsize(slave, *size)
        os.set_blocking(master, False)
        signals = (signal.SIGCHLD, signal.SIGWINCH, *FORWARDED_SIGNALS)
        with SignalPipe(signals) as sigs:
            pid = _spawn(path, argv, env, slave, master, signals)
            os.close(slave)
            slave = -1
            if saved is not None:
                tty.setraw(fds.stdin, termios.TCSANOW)
            state = _State(sink, clock, record_input)
            status = _loop(pid, master, fds, sigs, state, size)
    finally:
        if saved is not None:  # restore the outer terminal however we leave
            try:  # noqa: SIM105 (contextlib costs start time: relay_common.say)
                termios.tcsetattr(fds.stdin, termios.TCSADRAIN, saved)
            except termios.error:
                pass
        os.close(master)
        if slave >= 0:
            os.close(slave)
    streams = {
        "stdin": StreamStats(state.bytes_in, state.captured_in, None),
        "stdout": StreamStats(state.bytes_out, state.captured_out, None),
    }
    return RelayResult(status, streams, "recording service lost" if sink.lost else None)


def _loop(
    pid: int, master: int, fds: PtyFds, sigs: SignalPipe, st: _State, size: tuple[int, int] | None
) -> ChildStatus:
    poller = Poller()
    status: ChildStatus | None = None
    kill_at: float | None = None
    master_open = True
    while status is None:
        if st.sink.take_end_request():
            say(fds.stdout, "\r\n" + LOST_MESSAGE + "\r\n")
            _hangup(pid, signal.SIGHUP, master)
            st.input_open, st.pending, kill_at = False, b"", st.clock() + KILL_GRACE
        if kill_at is not None and st.clock() >= kill_at:
            _hangup(pid, signal.SIGKILL, master)
            kill_at = None
        wanted = {sigs.fd: _POLLIN}
        if master_open:
            wanted[master] = _POLLIN | (_POLLOUT if st.pending else 0)
        if st.input_open and not st.pending:
            wanted[fds.stdin] = _POLLIN
        watch = st.sink.watch_fd()
        if watch is not None:
            wanted[watch] = _POLLIN
        timeout = None if kill_at is None else max(0.0, kill_at - st.clock())
        for fd, events in poller.wait(wanted, timeout):
            if fd == sigs.fd:
                status, size = _on_signals(pid, master, fds, sigs.read(), st, size)
            elif fd == watch:
                st.sink.check()
            elif fd == master:
                if events & _POLLOUT and st.pending:
                    _flush(master, st)
                if events & ~_POLLOUT and not _read_output(master, fds, st):
                    master_open = False  # every slave fd is closed: wait for SIGCHLD
                    st.input_open, st.pending = False, b""
            elif fd == fds.stdin:
                _read_input(pid, master, fds, st)
    if master_open:
        _drain(master, fds, st)
    return status


def _on_signals(
    pid: int, master: int, fds: PtyFds, caught: list[int], st: _State, size: tuple[int, int] | None
) -> tuple[ChildStatus | None, tuple[int, int] | None]:
    for sig in caught:
        if sig == signal.SIGWINCH:
            new = get_winsize(fds.stdin)
            if new is not None and new != size:
                size = new
                _set_winsize(master, *new)
                st.sink.emit(encode_resize(st.clock(), *new))
        elif sig != signal.SIGCHLD:
            _hangup(pid, sig, master)  # SIGHUP from a closed outer terminal, an admin's TERM...
    return reap(pid), size


def _read_input(pid: int, master: int, fds: PtyFds, st: _State) -> None:
    try:
        data = os.read(fds.stdin, READ_SIZE)
    except OSError as exc:
        if not is_hangup(exc):
            raise
        data = b""
    if not data:  # the outer terminal hung up: hang up the inner one, as the kernel would
        st.input_open = st.output_open = False
        _hangup(pid, signal.SIGHUP, master)
        return
    st.on_input(master, data)
    _flush(master, st)


def _flush(master: int, st: _State) -> None:
    try:
        st.pending = try_write(master, st.pending)
    except OSError:
        st.pending = b""


def _read_master(master: int) -> tuple[bytes, bool]:
    """What the master holds now, up to READ_SIZE, and whether the slave side is alive.

    A pty hands out output in small pieces (about 1-4 KiB per read under a flood): reading
    until EAGAIN before relaying turns many small writes and DATA messages into one, and
    costs one extra read(2) per keystroke echo.
    """
    chunks: list[bytes] = []
    total = 0
    while total < READ_SIZE:
        try:
            data = os.read(master, READ_SIZE - total)
        except BlockingIOError:
            break
        except OSError as exc:
            if is_hangup(exc):  # EIO: every slave fd is closed
                return b"".join(chunks), False
            raise
        if not data:
            return b"".join(chunks), False
        chunks.append(data)
        total += len(data)
    return b"".join(chunks), True


def _read_output(master: int, fds: PtyFds, st: _State) -> bool:
    """Relay what the child printed; False when the slave side is gone (EIO)."""
    data, alive = _read_master(master)
    if not data:
        return alive
    st.bytes_out += len(data)
    if st.sink.active:
        st.captured_out += len(data)
        st.sink.emit(encode_data(st.clock(), Stream.OUTPUT, data))
    if st.output_open:
        try:
            write_all(fds.stdout, data)
        except OSError as exc:
            if not is_hangup(exc):
                raise
            st.output_open = st.input_open = False
    return alive


def _drain(master: int, fds: PtyFds, st: _State) -> None:
    """The child exited: relay what it wrote last (the pty may still be delivering it)."""
    poller = Poller()
    until = st.clock() + DRAIN_MAX  # a background job may keep printing: sshd would not wait
    while st.clock() < until:
        ready = poller.wait({master: _POLLIN}, DRAIN_IDLE)
        if not ready or not _read_output(master, fds, st):
            return  # quiet (a background job holds the slave), or EIO: everything is out


def _hangup(pid: int, sig: int, master: int = -1) -> None:
    """Signal the child's process group (it leads its session: setsid) and, as the
    kernel does on a terminal hangup, the inner terminal's foreground job."""
    groups = [pid]
    if master >= 0:
        try:  # noqa: SIM105 (contextlib costs start time: relay_common.say)
            groups.append(os.tcgetpgrp(master))
        except OSError:
            pass
    for group in dict.fromkeys(groups):
        try:  # noqa: SIM105
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
