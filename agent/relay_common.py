"""Pieces shared by the recorder's two relays (pty: relay_pty, pipes: relay_exec).

Invariants:
- Standard library only, and only its cheap modules: this runs on every login (DESIGN.md
  "Performance facts"; agent/protocol.py says what the usual ones cost and what stands in).
- :class:`Sink` never raises into a relay: a failed send marks the daemon link lost, closes
  it (so the daemon sees EOF and can say ``recorder_lost``) and sends nothing more; the relay
  asks :meth:`Sink.take_end_request` whether the policy wants the session ended.
- Signals reach the relay's poll loop through a self-pipe (``signal.set_wakeup_fd``), so the
  loop sleeps in poll and never busy-waits; :class:`SignalPipe` restores what it replaced.
"""

from __future__ import annotations

import _socket  # not socket: its enums and selectors cost ~7 ms at every login
import errno
import os
import select

from sshaudit.agent.protocol import Frozen

# typing costs start time at every login: it is imported for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable, Iterable, Mapping
    from types import FrameType, TracebackType
    from typing import Any

    Clock = Callable[[], float]
    """Seconds since the recorder started (monotonic): the times of DATA/RESIZE/MARKER."""
else:
    # Not signal: it wraps _signal to hand out enums, and enum costs ~5 ms at every login.
    # _signal has the same functions and constants; handlers come back as plain ints.
    import _signal


# Signals a relay passes on to its child. sshd itself refuses "signal" channel requests
# for forced commands, so these come from the system (shutdown, an admin's kill).
FORWARDED_SIGNALS = (
    _signal.SIGHUP,
    _signal.SIGTERM,
    _signal.SIGINT,
    _signal.SIGQUIT,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
)
LOST_MESSAGE = "sshaudit: the recording service is unavailable; ending the session"


class ChildStatus(Frozen):
    """How the child ended: an exit status, or the signal that killed it."""

    __slots__ = ("exit_status", "signal")  # field order: __init__'s (see Frozen)
    exit_status: int | None
    signal: int | None

    def __init__(self, exit_status: int | None, signal: int | None) -> None:
        super().__init__(exit_status, signal)

    @classmethod
    def from_wait(cls, status: int) -> ChildStatus:
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        return cls(os.WEXITSTATUS(status), None)


class StreamStats(Frozen):
    """What END reports for one byte stream (issue3.md)."""

    __slots__ = ("bytes", "captured", "sha256")
    bytes: int
    captured: int
    sha256: str | None

    def __init__(self, bytes: int, captured: int, sha256: str | None) -> None:
        super().__init__(bytes, captured, sha256)

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "captured": self.captured, "sha256": self.sha256}


class RelayResult(Frozen):
    __slots__ = ("status", "streams", "error")  # noqa: RUF023
    status: ChildStatus
    streams: Mapping[str, StreamStats]
    error: str | None

    def __init__(
        self,
        status: ChildStatus,
        streams: Mapping[str, StreamStats] | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__(status, {} if streams is None else streams, error)

    def count(self, name: str) -> int:
        stats = self.streams.get(name)
        return stats.bytes if stats else 0


class Sink:
    """The daemon link as a relay sees it: ``send`` plus, optionally, the socket to watch.

    ``send`` is any callable taking one encoded message (``socket.sendall`` in production,
    a socketpair in tests, ``None`` for an unrecorded session). ``watch`` is polled by the
    relay: the daemon never speaks mid-session, so readability means it hung up.
    """

    def __init__(
        self,
        send: Callable[[bytes], object] | None,
        *,
        watch: _socket.socket | None = None,
        end_on_loss: bool = False,
    ) -> None:
        self._send = send
        self._watch = watch
        self.end_on_loss = end_on_loss
        self.lost = False
        self._end_pending = False

    @property
    def active(self) -> bool:
        return self._send is not None and not self.lost

    def watch_fd(self) -> int | None:
        return self._watch.fileno() if self._watch is not None and self.active else None

    def emit(self, message: bytes) -> None:
        if self._send is None or self.lost:
            return
        try:
            self._send(message)
        except OSError:  # EPIPE, ECONNRESET, the link's send timeout
            self._lose()

    def check(self) -> None:
        """The watched socket is readable: EOF or an error means the daemon went away."""
        if self._watch is None or self.lost:
            return
        try:
            data = self._watch.recv(4096, _socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lose()

    def take_end_request(self) -> bool:
        """True once, after the link was lost, when the policy says to end the session."""
        if self._end_pending:
            self._end_pending = False
            return True
        return False

    def _lose(self) -> None:
        self.lost = True
        self._end_pending = self.end_on_loss
        if self._watch is not None:
            self._watch.close()


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    """A Python-level handler, so the C handler writes the wakeup byte."""


class SignalPipe:
    """Deliver ``signals`` as bytes on :attr:`fd` for a poll loop; restore on exit.

    Must be entered on the main thread (a limit of ``signal.set_wakeup_fd``).
    """

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(signals)
        self.fd = -1
        self._w = -1
        self._old_wakeup = -1
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalPipe:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._old_wakeup = _signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in self.signals:
            self._old[sig] = _signal.signal(sig, _ignore)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, old in self._old.items():
            _signal.signal(sig, old)
        _signal.set_wakeup_fd(self._old_wakeup)
        os.close(self.fd)
        os.close(self._w)

    def read(self) -> list[int]:
        """The signals caught since the last read (one entry per delivery, in order)."""
        try:
            return list(os.read(self.fd, 512))
        except BlockingIOError:
            return []


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write everything to a blocking fd (backpressure from sshd is wanted here)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def try_write(fd: int, data: bytes) -> bytes:
    """Write what a non-blocking fd takes now; return the rest."""
    try:
        n = os.write(fd, data)
    except BlockingIOError:
        return data
    return data[n:]


def reap(pid: int) -> ChildStatus | None:
    """The child's status if it has ended (never blocks)."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return ChildStatus(None, None)
    return ChildStatus.from_wait(status) if done == pid else None


def is_hangup(exc: OSError) -> bool:
    """Errors that mean the other end of a pipe, socket or tty went away."""
    return exc.errno in (errno.EPIPE, errno.EIO, errno.ECONNRESET, errno.EBADF)


def say(fd: int, text: str) -> None:
    """Best-effort message to the user (their stderr, or the terminal)."""
    # Not contextlib.suppress (SIM105): importing contextlib costs ~5 ms at every login.
    try:  # noqa: SIM105
        write_all(fd, text.encode("utf-8", "replace"))
    except OSError:
        pass


class Poller:
    """``select.poll`` whose registrations follow a wanted ``{fd: events}`` map each round."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._have: dict[int, int] = {}

    def wait(self, wanted: Mapping[int, int], timeout: float | None) -> list[tuple[int, int]]:
        for fd in [fd for fd in self._have if fd not in wanted]:
            self._poll.unregister(fd)
            del self._have[fd]
        for fd, events in wanted.items():
            if self._have.get(fd) != events:
                self._poll.register(fd, events)
                self._have[fd] = events
        ms = None if timeout is None else max(0, int(timeout * 1000) + 1)
        return self._poll.poll(ms)


def close_user_fd(fd: int) -> None:
    """Close our end of a user-facing stream so sshd sees EOF (RFC 4254 5.3 channel EOF).

    Fds 0-2 are pointed at /dev/null instead of closed, so a later open() cannot take
    their numbers and receive stray writes.
    """
    try:
        if fd > 2:
            os.close(fd)
            return
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd, inheritable=False)
        os.close(null)
    except OSError:
        pass
