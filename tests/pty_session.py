"""A program (``ssh -tt``) on a new pseudo-terminal, driven like a user at a terminal.

Invariants:
- the child runs in its own session with the pty slave as its controlling terminal, so
  resizing the pty (TIOCSWINSZ on the master) makes the kernel send it SIGWINCH, and closing
  the master hangs it up (SIGHUP), exactly as a terminal emulator does (termios(3), pty(7));
- everything read from the master is kept in :attr:`PtySession.output`; :meth:`read_until`
  consumes it in order, so a pattern is never matched twice;
- every wait has a deadline; a timeout raises :class:`PtyWaitError` showing what was read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence

from sshaudit.errors import SSHAuditError


class PtyWaitError(SSHAuditError):
    """The pty did not show what a test waited for in time (or reached EOF first)."""


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _make_controlling_tty() -> None:
    # Runs in the child after setsid() (start_new_session): stdin, the pty slave, becomes
    # the controlling terminal of the new session (TIOCSCTTY, tty_ioctl(4)).
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtySession:
    """``argv`` running on a fresh pty of ``rows`` x ``cols``; use as a context manager."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        rows: int = 24,
        cols: int = 80,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.output = bytearray()
        self._pos = 0
        self._eof = False
        master, slave = os.openpty()
        try:
            _set_winsize(slave, rows, cols)  # before the child starts: it reads it at once
            self.proc = subprocess.Popen(
                self.argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                preexec_fn=_make_controlling_tty,
                env=None if env is None else dict(env),
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master: int | None = master

    def __enter__(self) -> PtySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes | str) -> None:
        """Type ``data`` (str is UTF-8 encoded); a newline is ``"\\r"``, as Enter sends."""
        raw = data.encode() if isinstance(data, str) else data
        fd = self._fd()
        while raw:
            written = os.write(fd, raw)
            raw = raw[written:]

    def set_size(self, rows: int, cols: int) -> None:
        """Resize the terminal; the kernel sends SIGWINCH to the child's process group."""
        _set_winsize(self._fd(), rows, cols)

    def _fd(self) -> int:
        if self.master is None:
            raise PtyWaitError("the pty session is closed")
        return self.master

    def _fill(self, deadline: float) -> bool:
        """Read what is available before ``deadline``; False on EOF or timeout."""
        if self._eof or self.master is None:
            return False
        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError as exc:
            if exc.errno != errno.EIO:  # Linux: EIO on the master once the slave is gone
                raise
            chunk = b""
        if not chunk:
            self._eof = True
            return False
        self.output += chunk
        return True

    def read_until(self, pattern: bytes | re.Pattern[bytes], timeout: float = 10.0) -> bytes:
        """Consume and return the output up to the end of the first match of ``pattern``."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.output, self._pos)
            if m is not None:
                got = bytes(self.output[self._pos : m.end()])
                self._pos = m.end()
                return got
            if not self._fill(deadline):
                if not self._eof and time.monotonic() < deadline:
                    continue
                why = "EOF" if self._eof else f"{timeout} s"
                tail = bytes(self.output[self._pos :])[-2000:]
                raise PtyWaitError(f"{why} before {regex.pattern!r}; unconsumed output: {tail!r}")

    def read_line(self, text: bytes | str, timeout: float = 10.0) -> bytes:
        """Consume up to an output line that is exactly ``text``.

        The line must follow a CR or LF and end with CRLF, so the terminal's echo of a typed
        command (``$ echo hello``) never matches, whatever escape sequences the shell adds
        (bash's bracketed-paste mode writes ``ESC[?2004l CR`` before a command's output).
        """
        raw = text.encode() if isinstance(text, str) else text
        return self.read_until(re.compile(rb"(?:\A|[\r\n])" + re.escape(raw) + rb"\r\n"), timeout)

    def read_to_eof(self, timeout: float = 10.0) -> bytes:
        """Consume and return everything until the child closes the terminal."""
        deadline = time.monotonic() + timeout
        while not self._eof:
            if not self._fill(deadline) and not self._eof and time.monotonic() >= deadline:
                raise PtyWaitError(f"no EOF within {timeout} s: {bytes(self.output[-2000:])!r}")
        got = bytes(self.output[self._pos :])
        self._pos = len(self.output)
        return got

    def wait(self, timeout: float = 10.0) -> int:
        """The child's exit status (negative: killed by that signal), reading meanwhile."""
        self.read_to_eof(timeout)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise PtyWaitError(f"{self.argv[0]} did not exit within {timeout} s") from exc

    def close(self, timeout: float = 5.0) -> int:
        """Hang up (close the master), then SIGTERM/SIGKILL the child if it lingers."""
        if self.master is not None:
            os.close(self.master)
            self.master = None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
