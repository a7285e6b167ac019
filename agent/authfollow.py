"""Follow sshd's log: a file written by ``sshd -E FILE``, or journald through ``journalctl``.

Invariants:
- Both followers run until ``stop`` is set, hand every complete line to ``on_line`` as a
  :class:`LogLine` (raw bytes: decoding is the parser's job, agent/authlog.py) and never
  raise for I/O trouble: a missing file, a rotated or truncated file, a dead or missing
  journalctl are logged (logger ``sshaudit.agent.authfollow``) and retried. An exception
  from ``on_line`` is logged and the line skipped. Only bad arguments raise (UsageError).
- Memory is bounded: a line longer than ``MAX_LINE`` bytes is dropped up to its newline;
  a partial last line is kept until its newline arrives (or the file is rotated/truncated).
- File rotation is noticed by the path's (device, inode) changing: the old file is read to
  its end first, then the new one from its start, and the old one is still read for
  ``ROTATE_GRACE`` seconds (sshd -E writes to it until restarted). Truncation (size below
  our offset, as ``logrotate copytruncate`` does) restarts at offset 0.
- journalctl runs with ``-o json -f -n 0`` (journalctl(1)): MESSAGE is a string, or an
  array of byte values when it is not valid UTF-8 (systemd.journal-fields(7)); _PID and
  __REALTIME_TIMESTAMP (microseconds since the epoch) are strings. It is restarted with
  exponential backoff (0.5 s doubling to 30 s, back to 0.5 s after a line arrives).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sshaudit.errors import UsageError

log = logging.getLogger("sshaudit.agent.authfollow")

MAX_LINE = 64 * 1024
READ_SIZE = 64 * 1024
# SYSLOG_IDENTIFIER rather than "-u ssh": pam_systemd moves each connection's sshd into the
# user's session scope, so its later lines (forwarding refusals, disconnects) are no longer
# in ssh.service's unit; every sshd process logs with identifier "sshd".
JOURNAL_ARGV = ("journalctl", "-o", "json", "-f", "-n", "0", "SYSLOG_IDENTIFIER=sshd")
ROTATE_GRACE = 5.0
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


@dataclass(frozen=True)
class LogLine:
    """One log message; ``pid`` and ``time`` when the source knows them (journald)."""

    message: bytes
    pid: int | None = None
    time: datetime | None = None


OnLine = Callable[[LogLine], None]


class _Lines:
    """Splits a byte stream into lines, bounded by MAX_LINE."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    self._buf.clear()
                    self._skipping = True  # drop the rest of this over-long line
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._skipping or len(line) > MAX_LINE:
                self._skipping = False
                continue
            out.append(line.rstrip(b"\r"))

    def reset(self) -> None:
        self._buf.clear()
        self._skipping = False


def _deliver(on_line: OnLine, line: LogLine) -> None:
    try:
        on_line(line)
    except Exception:  # the caller's bug must not stop the follower
        log.exception("auth log line handler failed; line skipped")


# -- a file written by sshd -E ------------------------------------------------------------


class _Reader:
    """One open file and the partial line read from it."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        st = os.fstat(file.fileno())
        self.ident = (st.st_dev, st.st_ino)
        self.lines = _Lines()

    def drain(self, path: Path, on_line: OnLine) -> bool:
        """Deliver every complete line; False when the file failed and must be dropped."""
        while True:
            try:
                data = self.file.read(READ_SIZE)
            except OSError as exc:
                log.warning("reading %s failed (%s); reopening", path, exc)
                return False
            if not data:
                return True
            for line in self.lines.feed(data):
                _deliver(on_line, LogLine(line))


class _FileState:
    def __init__(self, path: Path, poll: float) -> None:
        self.path = path
        self.current: _Reader | None = None
        # After a rotation the old file is still read for ROTATE_GRACE seconds: sshd -E keeps
        # writing to it until it is restarted or HUPed (logrotate creates the new file first).
        self.retired: _Reader | None = None
        self.retired_polls = 0
        self.grace_polls = max(1, int(ROTATE_GRACE / poll))
        self.missing_logged = False

    def open(self, at_end: bool) -> bool:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - kept open while following
        except OSError as exc:
            if not self.missing_logged:
                log.warning("cannot open sshd log %s (%s); waiting for it", self.path, exc)
                self.missing_logged = True
            return False
        self.missing_logged = False
        self.retire()
        self.current = _Reader(f)
        if at_end:
            f.seek(0, os.SEEK_END)
        return True

    def retire(self) -> None:
        self.drop_retired()
        self.retired, self.current = self.current, None
        self.retired_polls = self.grace_polls

    def drop_retired(self) -> None:
        if self.retired is not None:
            self.retired.file.close()
        self.retired = None

    def close(self) -> None:
        self.drop_retired()
        if self.current is not None:
            self.current.file.close()
        self.current = None


def follow_file(
    path: str | Path,
    on_line: OnLine,
    stop: threading.Event,
    poll: float = 0.2,
    from_start: bool = False,
) -> None:
    """Follow ``path`` until ``stop`` is set; start at its end unless ``from_start``."""
    if poll <= 0:
        raise UsageError("poll must be > 0")
    state = _FileState(Path(path), poll)
    try:
        state.open(at_end=not from_start)
        while not stop.is_set():
            _drain_retired(state, on_line)
            if state.current is None and not state.open(at_end=False):
                stop.wait(poll)
                continue
            assert state.current is not None
            if not state.current.drain(state.path, on_line):
                state.close()
            elif not _check_rotation(state):
                stop.wait(poll)
    finally:
        state.close()


def _drain_retired(state: _FileState, on_line: OnLine) -> None:
    if state.retired is None:
        return
    if not state.retired.drain(state.path, on_line) or state.retired_polls <= 0:
        state.drop_retired()
    state.retired_polls -= 1


def _check_rotation(state: _FileState) -> bool:
    """Reopen on rotation or truncation; True when there may be more to read now."""
    assert state.current is not None
    try:
        st = state.path.stat()
    except OSError:
        return False  # renamed away and not yet recreated: keep the old file
    if (st.st_dev, st.st_ino) != state.current.ident:
        log.info("sshd log %s was rotated; following the new file", state.path)
        return state.open(at_end=False)
    if st.st_size < state.current.file.tell():
        log.info("sshd log %s was truncated; reading from its start", state.path)
        state.current.file.seek(0)
        state.current.lines.reset()
        return True
    return False


# -- journald -----------------------------------------------------------------------------


def parse_journal_entry(raw: bytes) -> LogLine | None:
    """One line of ``journalctl -o json`` -> a LogLine; None when it is not usable."""
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(entry, dict):
        return None
    message = _message(entry.get("MESSAGE"))
    if message is None:
        return None
    return LogLine(message, _int(entry.get("_PID")), _realtime(entry.get("__REALTIME_TIMESTAMP")))


def _message(value: Any) -> bytes | None:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if (
        isinstance(value, list)
        and len(value) <= MAX_LINE
        and all(isinstance(b, int) and 0 <= b <= 255 for b in value)
    ):
        return bytes(value)
    return None


def _int(value: Any, digits: int = 10) -> int | None:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= digits:
        return int(value)
    return None


def _realtime(value: Any) -> datetime | None:
    micros = _int(value, digits=18)
    if micros is None:
        return None
    try:
        return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def follow_journal(
    on_line: OnLine,
    stop: threading.Event,
    argv: Sequence[str] = JOURNAL_ARGV,
    backoff_start: float = BACKOFF_START,
    backoff_max: float = BACKOFF_MAX,
) -> None:
    """Run ``argv`` (journalctl with JSON output) until ``stop``; restart it when it dies."""
    if not argv or backoff_start <= 0 or backoff_max < backoff_start:
        raise UsageError("follow_journal needs a command and 0 < backoff_start <= backoff_max")
    delay = backoff_start
    while not stop.is_set():
        got_line = _run_journal(list(argv), on_line, stop)
        if stop.is_set():
            return
        delay = backoff_start if got_line else min(delay * 2, backoff_max)
        log.warning("%s stopped; restarting in %.1f s", argv[0], delay)
        stop.wait(delay)


def _run_journal(argv: list[str], on_line: OnLine, stop: threading.Event) -> bool:
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except OSError as exc:
        log.warning("cannot run %s: %s", argv[0], exc)
        return False
    got_line = False
    lines = _Lines()
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not stop.is_set():
                if not sel.select(timeout=0.2):
                    continue
                data = os.read(fd, READ_SIZE)
                if not data:
                    break
                for raw in lines.feed(data):
                    entry = parse_journal_entry(raw)
                    if entry is not None:
                        got_line = True
                        _deliver(on_line, entry)
    except OSError as exc:
        log.warning("reading from %s failed: %s", argv[0], exc)
    finally:
        _end(proc)
    return got_line


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
