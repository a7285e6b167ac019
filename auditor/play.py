"""Replay of a recording in the auditor's terminal, timed, with pause/step/quit keys.

:func:`play` is the core and does no I/O itself: it takes the writer, the clock and the
key-waiting function as parameters. :func:`play_terminal` wires it to a real terminal.

Invariants:
- only output ("o") events reach the terminal, always through
  :class:`~sshaudit.termsafe.Sanitizer`, and :meth:`~sshaudit.termsafe.Sanitizer.restore` is
  written at the end whatever happens (quit, error, signal), so the terminal is left usable;
- input ("i") events are not shown, markers are skipped, and resize ("r") events do not resize
  the auditor's terminal (a recording must not drive the auditor's window);
- timing follows asciinema: the gap between two output events is first capped at
  ``idle_limit`` (recording time), then divided by ``speed``; the schedule is absolute (event
  n is due at the sum of the gaps before it), so sleeping late never accumulates drift;
- while paused the schedule stops: on resume the next event comes after what was left of its gap;
- the terminal mode changed by :func:`play_terminal` is restored on every exit path, SIGTERM
  included.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from types import FrameType
from typing import BinaryIO

from sshaudit.asciicast import Code, Event
from sshaudit.errors import UsageError
from sshaudit.termsafe import Sanitizer

PAUSED_WAIT = 3600.0  # seconds asked of sleep_or_key per wait while paused (it loops)
_PAUSE = frozenset(b" ")
_STEP = frozenset(b".")
_QUIT = frozenset(b"qQ\x03")  # q, and ^C when the terminal delivers it as a byte


@dataclass(frozen=True)
class PlayResult:
    """``events``: output events played; ``quit``: the viewer stopped before the end;
    ``elapsed``: wall-clock seconds (by the clock given to :func:`play`)."""

    events: int
    quit: bool
    elapsed: float


class _Mode(Enum):
    PLAYING = "playing"
    PAUSED = "paused"


class _Schedule:
    """Virtual time (recording time, capped and scaled) against the wall clock."""

    def __init__(
        self, sleep_or_key: Callable[[float], bytes | None], clock: Callable[[], float]
    ) -> None:
        self._sleep_or_key = sleep_or_key
        self._clock = clock
        self._origin = clock()  # wall time at virtual time 0 (moved on by pauses)
        self._position = 0.0  # virtual time at which the replay was paused
        self.mode = _Mode.PLAYING
        self.quit = False

    def wait(self, due: float) -> bool:
        """Wait until virtual time ``due`` or a step key; False when the viewer quits."""
        while not self.quit:
            if self.mode is _Mode.PAUSED:
                if self._keys(self._sleep_or_key(PAUSED_WAIT), due):
                    return True
                continue
            remaining = self._origin + due - self._clock()
            if remaining <= 0:
                return True
            self._keys(self._sleep_or_key(remaining), due)
        return False

    def _keys(self, keys: bytes | None, due: float) -> bool:
        """Apply the keys pressed, in order; True when a step asks for the next event now."""
        for key in keys or b"":
            if key in _QUIT:
                self.quit = True
                return False
            if key in _PAUSE:
                self._toggle()
            elif key in _STEP and self.mode is _Mode.PAUSED:
                self._position = due  # as if the replay had run up to this event
                return True
        return False

    def _toggle(self) -> None:
        now = self._clock()
        if self.mode is _Mode.PLAYING:
            self._position = now - self._origin
            self.mode = _Mode.PAUSED
        else:
            self._origin = now - self._position
            self.mode = _Mode.PLAYING


def _check(speed: float, idle_limit: float | None) -> None:
    if not (math.isfinite(speed) and speed > 0):
        raise UsageError(f"speed must be a positive number, not {speed}")
    if idle_limit is not None and not (math.isfinite(idle_limit) and idle_limit > 0):
        raise UsageError(f"idle limit must be a positive number of seconds, not {idle_limit}")


def play(
    events: Iterable[Event],
    *,
    write: Callable[[bytes], object],
    speed: float = 1.0,
    idle_limit: float | None = None,
    sleep_or_key: Callable[[float], bytes | None],
    clock: Callable[[], float],
) -> PlayResult:
    """Replay the output events through the sanitizer, on time.

    ``sleep_or_key(timeout)`` waits up to ``timeout`` seconds and returns the keys pressed
    (or None): space pauses and resumes, ``.`` shows the next event while paused, ``q`` quits.
    ``write`` gets UTF-8 bytes. Raises UsageError for a speed or idle limit that is not a
    positive number."""
    _check(speed, idle_limit)
    start = clock()
    schedule = _Schedule(sleep_or_key, clock)
    sanitizer = Sanitizer()
    played, due, previous = 0, 0.0, 0.0
    try:
        for event in events:
            if event.code is not Code.OUTPUT:
                continue
            gap = max(0.0, event.time - previous)  # time runs from 0, as in asciinema
            previous = event.time
            if idle_limit is not None:
                gap = min(gap, idle_limit)
            due += gap / speed
            if not schedule.wait(due):
                break
            if text := sanitizer.feed(event.data):
                write(text.encode())
            played += 1
    finally:
        if tail := sanitizer.flush() + sanitizer.restore():
            with contextlib.suppress(OSError):  # e.g. the reader of a pipe went away
                write(tail.encode())
    return PlayResult(events=played, quit=schedule.quit, elapsed=clock() - start)


def play_terminal(
    events: Iterable[Event],
    *,
    speed: float,
    idle_limit: float | None,
    stdin_fd: int = 0,
    stdout: BinaryIO | None = None,
) -> PlayResult:
    """:func:`play` on a terminal: keys are read from ``stdin_fd`` (put in cbreak mode: no
    echo, no line editing, signals kept; restored on exit), output goes to ``stdout``
    (default: the process's standard output). When ``stdin_fd`` is not a terminal the
    replay runs with its timing and no keys."""
    _check(speed, idle_limit)
    out = stdout if stdout is not None else sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    if not os.isatty(stdin_fd):
        return play(
            events,
            write=write,
            speed=speed,
            idle_limit=idle_limit,
            sleep_or_key=_sleep,
            clock=time.monotonic,
        )
    with _keyboard(stdin_fd) as keys:
        return play(
            events,
            write=write,
            speed=speed,
            idle_limit=idle_limit,
            sleep_or_key=keys,
            clock=time.monotonic,
        )


def _sleep(timeout: float) -> None:
    time.sleep(timeout)


@contextlib.contextmanager
def _keyboard(fd: int) -> Iterator[Callable[[float], bytes | None]]:
    """cbreak mode on ``fd`` for the duration; yields a ``sleep_or_key`` reading it."""
    saved = termios.tcgetattr(fd)
    # SIGTERM raises SystemExit, so the finally blocks (here and in play) run. Handlers can
    # only be set in the main thread; elsewhere the caller's signal handling stays as it is.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        mode = termios.tcgetattr(fd)
        mode[3] &= ~(termios.ECHO | termios.ICANON)  # lflag: ISIG stays, so ^C still works
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        yield lambda timeout: _read_key(fd, timeout)
    finally:
        # TCSAFLUSH: keys typed during the replay and not read must not reach the shell.
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _read_key(fd: int, timeout: float) -> bytes | None:
    """Keys pressed within ``timeout`` seconds, or None. A terminal that went away (EOF,
    EIO on hang-up) reads as ``q``: there is nobody left to watch."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return None
    try:
        data = os.read(fd, 64)
    except OSError:
        return b"q"
    return data or b"q"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
