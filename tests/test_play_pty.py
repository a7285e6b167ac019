"""Tests of sshaudit.auditor.play: the timing core with a fake clock, then play_terminal
run in a child process on a real pseudo-terminal (timing, keys, sanitising, tty restore)."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sshaudit.asciicast import Code, Event
from sshaudit.auditor.play import PlayResult, play
from sshaudit.errors import UsageError


# -- the core, with a fake clock ---------------------------------------------------------
class FakeTerminal:
    """A clock that advances only when the player sleeps, and keys pressed at given times."""

    def __init__(self, keys: list[tuple[float, bytes]] | None = None) -> None:
        self.now = 0.0
        self.keys = sorted(keys or [])
        self.written: list[tuple[float, bytes]] = []

    def clock(self) -> float:
        return self.now

    def sleep_or_key(self, timeout: float) -> bytes | None:
        assert timeout > 0
        if self.keys and self.keys[0][0] <= self.now + timeout:
            at, key = self.keys.pop(0)
            self.now = max(self.now, at)
            return key
        self.now += timeout
        assert self.now < 1e6, "the player waits for ever"
        return None

    def write(self, data: bytes) -> None:
        self.written.append((self.now, data))

    def times(self) -> list[float]:
        return [round(at, 6) for at, _ in self.written]

    def output(self) -> bytes:
        return b"".join(data for _, data in self.written)


def out(t: float, text: str) -> Event:
    return Event(t, Code.OUTPUT, text)


def run(
    events: list[Event], term: FakeTerminal, speed: float = 1.0, idle_limit: float | None = None
) -> PlayResult:
    return play(
        events,
        write=term.write,
        speed=speed,
        idle_limit=idle_limit,
        sleep_or_key=term.sleep_or_key,
        clock=term.clock,
    )


THREE = [out(0.5, "a"), out(1.5, "b"), out(4.0, "c")]  # gaps 0.5, 1.0, 2.5


def test_speed_divides_every_gap() -> None:
    term = FakeTerminal()
    result = run(THREE, term, speed=2.0)
    assert term.times() == [0.25, 0.75, 2.0]
    assert result == PlayResult(events=3, quit=False, elapsed=2.0)


def test_idle_limit_caps_recording_time_then_speed_divides() -> None:
    term = FakeTerminal()
    run(THREE, term, speed=2.0, idle_limit=1.0)
    # gaps capped to 0.5, 1.0, 1.0, then halved; the other order would give 1.75 last.
    assert term.times() == [0.25, 0.75, 1.25]


def test_only_output_is_written_and_timed() -> None:
    events = [
        out(1.0, "a"),
        Event(2.0, Code.INPUT, "typed secret"),
        Event(3.0, Code.RESIZE, "200x60"),
        Event(4.0, Code.MARKER, "mark"),
        out(5.0, "b"),
    ]
    term = FakeTerminal()
    result = run(events, term, idle_limit=2.0)
    assert term.output() == b"ab"
    assert term.times() == [1.0, 3.0]  # the gap from a to b is 4 s, capped at 2
    assert result.events == 2


def test_pause_stops_time_and_resume_keeps_the_rest_of_the_gap() -> None:
    term = FakeTerminal([(0.25, b" "), (10.25, b" ")])
    run([out(0.0, "A"), out(1.0, "B")], term)
    assert term.times() == [0.0, 11.0]


def test_step_plays_one_event_while_paused() -> None:
    term = FakeTerminal([(1.0, b" "), (2.0, b"."), (5.0, b" ")])
    run([out(0.0, "A"), out(10.0, "B"), out(20.0, "C")], term)
    assert term.times() == [0.0, 2.0, 15.0]  # C comes its full 10 s gap after B


def test_step_is_ignored_while_playing() -> None:
    term = FakeTerminal([(1.0, b".")])
    run([out(0.0, "A"), out(3.0, "B")], term)
    assert term.times() == [0.0, 3.0]


def test_quit_stops_and_still_restores_the_terminal() -> None:
    term = FakeTerminal([(0.5, b"q")])
    result = run([out(0.0, "\x1b[?1049hA"), out(3.0, "B")], term)
    assert result == PlayResult(events=1, quit=True, elapsed=0.5)
    assert term.output() == b"\x1b[?1049hA\x1b[?1049l"


def test_several_keys_at_once_apply_in_order() -> None:
    term = FakeTerminal([(0.5, b" q")])  # pause, then quit while paused
    result = run([out(0.0, "A"), out(3.0, "B")], term)
    assert result.quit
    assert term.output() == b"A"


def test_output_is_sanitised_across_events() -> None:
    events = [out(0.0, "x\x1b]5"), out(0.1, "2;c;ZXZpbA==\x07y\x1b["), out(0.2, "21tz\udc80")]
    term = FakeTerminal()
    run(events, term)
    assert term.output() == "xyz\ufffd".encode()


@pytest.mark.parametrize(
    "options",
    [
        (0.0, None),
        (-1.0, None),
        (math.nan, None),
        (math.inf, None),
        (1.0, 0.0),
        (1.0, -2.0),
        (1.0, math.nan),
    ],
)
def test_bad_speed_or_idle_limit(options: tuple[float, float | None]) -> None:
    with pytest.raises(UsageError):
        run(THREE, FakeTerminal(), *options)


# -- play_terminal on a real pty ---------------------------------------------------------
DRIVER = """
import json, sys
from sshaudit.asciicast import decode_all
from sshaudit.auditor.play import play_terminal
_, events = decode_all(open(sys.argv[1], "rb").read())
idle = float(sys.argv[3]) if sys.argv[3] else None
result = play_terminal(events, speed=float(sys.argv[2]), idle_limit=idle)
print(json.dumps({"events": result.events, "quit": result.quit}), file=sys.stderr)
"""


def write_cast(path: Path, events: list[tuple[float, str]]) -> Path:
    lines = [json.dumps({"version": 2, "width": 80, "height": 24})]
    lines += [json.dumps([t, "o", text]) for t, text in events]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class PtyPlayer:
    """The driver in a child process whose stdin and stdout are the slave of a new pty."""

    def __init__(self, cast: Path, speed: float = 1.0, idle_limit: float | None = None) -> None:
        self.master, self.slave = os.openpty()
        self.initial = termios.tcgetattr(self.slave)
        args = [sys.executable, "-c", DRIVER, str(cast), str(speed), str(idle_limit or "")]
        self.proc = subprocess.Popen(
            args, stdin=self.slave, stdout=self.slave, stderr=subprocess.PIPE
        )
        self.output = b""
        self.seen: dict[bytes, float] = {}

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            self.output += os.read(self.master, 65536)
            now = time.monotonic()
            for token in {t for t in TOKENS if t in self.output} - self.seen.keys():
                self.seen[token] = now

    def wait_for(self, token: bytes, timeout: float = 5.0) -> float:
        deadline = time.monotonic() + timeout
        while token not in self.seen:
            assert time.monotonic() < deadline, f"{token!r} not shown: {self.output!r}"
            self._read(0.02)
        return self.seen[token]

    def sleep(self, seconds: float) -> None:
        """Keep reading (so the child never blocks on a full pty) for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._read(min(left, 0.02))

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self, timeout: float = 5.0) -> tuple[int, dict[str, object]]:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "the player did not end"
            self._read(0.02)
        self._read(0)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode()
        last = err.strip().splitlines()[-1] if err.strip() else ""
        return self.proc.returncode, json.loads(last) if last.startswith("{") else {"err": err}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        os.close(self.master)
        os.close(self.slave)


TOKENS = [f"<T{i}>".encode() for i in range(4)]


Start = Callable[..., PtyPlayer]


@pytest.fixture
def player(tmp_path: Path) -> Iterator[Start]:
    started: list[PtyPlayer] = []

    def start(
        events: list[tuple[float, str]], speed: float = 1.0, idle_limit: float | None = None
    ) -> PtyPlayer:
        started.append(PtyPlayer(write_cast(tmp_path / "rec.cast", events), speed, idle_limit))
        return started[-1]

    yield start
    for p in started:
        p.close()


def test_pty_speed_two_halves_the_time(player: Start) -> None:
    p = player([(0.0, "<T0>"), (1.0, "<T1>"), (2.0, "<T2>")], speed=2.0)
    span = p.wait_for(b"<T2>") - p.wait_for(b"<T0>")
    status, result = p.finish()
    assert (status, result) == (0, {"events": 3, "quit": False})
    assert 0.8 <= span <= 1.6, span  # 2.0 if speed were ignored, ~0 if timing were


def test_pty_idle_limit_caps_a_long_gap(player: Start) -> None:
    p = player([(0.0, "<T0>"), (5.0, "<T1>"), (5.4, "<T2>")], idle_limit=0.5)
    t0 = p.wait_for(b"<T0>")
    t1 = p.wait_for(b"<T1>")
    t2 = p.wait_for(b"<T2>")
    assert p.finish()[0] == 0
    assert 0.35 <= t1 - t0 <= 1.5, t1 - t0  # 5 s gap capped at 0.5
    assert 0.25 <= t2 - t1 <= 1.2, t2 - t1  # a gap under the limit is kept


def test_pty_attacks_are_not_emitted(player: Start) -> None:
    events = [
        (0.0, "\x1b]52;c;cm0gLXJmIH4K\x07<T0>"),
        (0.01, "\x1bP$qm\x1b\\\x1b[21t\x1b[6n\x1b[c\x1b[>c\x1b]0;x\x07"),
        (0.02, "\x1b]5"),  # an OSC 52 cut in two events
        (0.03, "2;c;AAAA\x1b\\\x9d52;c;QUFB\x9c\x90$qm\x9c\x9b21t\x1b_apc\x1b\\"),
        (0.04, "\x1b[31m<T1>\x1b[m\x05"),
    ]
    p = player(events)
    p.wait_for(b"<T1>")
    assert p.finish()[0] == 0
    shown = p.output
    for forbidden in (b"\x1b]", b"\x1bP", b"\x1b_", b"\x1b[21t", b"\x1b[6n", b"\x1b[c"):
        assert forbidden not in shown
    for c1 in (b"\xc2\x9d", b"\xc2\x90", b"\xc2\x9b", b"\xc2\x9c"):  # 8-bit forms, in UTF-8
        assert c1 not in shown
    assert b"\x05" not in shown
    assert b"\x1b[31m<T1>\x1b[m" in shown  # drawing is kept: not everything was stripped


def test_pty_q_quits_early_and_restores_the_tty(player: Start) -> None:
    p = player([(0.0, "\x1b[?1049h<T0>"), (3.0, "<T1>")])
    t0 = p.wait_for(b"<T0>")
    during = termios.tcgetattr(p.slave)
    assert not during[3] & termios.ECHO and not during[3] & termios.ICANON  # cbreak was set
    p.send(b"q")
    status, result = p.finish(timeout=2.5)
    assert (status, result) == (0, {"events": 1, "quit": True})
    assert time.monotonic() - t0 < 2.5
    assert b"<T1>" not in p.output
    assert p.output.endswith(b"\x1b[?1049l")  # the alternate screen was left
    assert termios.tcgetattr(p.slave) == p.initial


def test_pty_space_pauses_and_resumes(player: Start) -> None:
    p = player([(0.0, "<T0>"), (0.8, "<T1>"), (0.9, "<T2>")])
    t0 = p.wait_for(b"<T0>")
    p.send(b" ")
    p.sleep(1.2)
    assert b"<T1>" not in p.output  # due 0.8 s after T0, held by the pause
    resumed = time.monotonic()
    p.send(b" ")
    t1 = p.wait_for(b"<T1>")
    assert p.finish()[0] == 0
    assert t1 - t0 >= 1.5, t1 - t0  # 0.8 without the pause
    assert t1 - resumed <= 1.3, t1 - resumed


def test_pty_sigterm_restores_the_tty(player: Start) -> None:
    p = player([(0.0, "\x1b[?25l<T0>"), (5.0, "<T1>")])
    p.wait_for(b"<T0>")
    assert termios.tcgetattr(p.slave) != p.initial
    p.proc.send_signal(signal.SIGTERM)
    status, _ = p.finish(timeout=2.5)
    assert status == 128 + signal.SIGTERM
    assert termios.tcgetattr(p.slave) == p.initial
    assert p.output.endswith(b"\x1b[?25h")  # the cursor is shown again


def test_not_a_tty_replays_with_timing_and_no_keys(tmp_path: Path) -> None:
    cast = write_cast(tmp_path / "rec.cast", [(0.0, "a\x1b[6n"), (0.6, "b")])
    args = [sys.executable, "-c", DRIVER, str(cast), "2", ""]
    started = time.monotonic()
    done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"ab"
    assert json.loads(done.stderr) == {"events": 2, "quit": False}
    assert took >= 0.3, took  # 0.6 s at speed 2
