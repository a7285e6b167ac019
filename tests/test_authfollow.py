"""agent/authfollow.py: following a real log file (rotation, truncation, partial lines) and
a journalctl stand-in (a script passed as ``argv``) that prints, dies and is restarted."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sshd_harness import SshdFactory
from sshd_host import UnixUser, run_checked

from sshaudit.agent.authfollow import (
    MAX_LINE,
    LogLine,
    follow_file,
    follow_journal,
    parse_journal_entry,
)
from sshaudit.agent.authlog import parse_line
from sshaudit.agent.authmerge import AuthMerger
from sshaudit.errors import UsageError

WAIT = 10.0


class Collected:
    def __init__(self) -> None:
        self.lines: list[LogLine] = []
        self.lock = threading.Lock()

    def __call__(self, line: LogLine) -> None:
        with self.lock:
            self.lines.append(line)

    def messages(self) -> list[bytes]:
        with self.lock:
            return [ln.message for ln in self.lines]

    def wait_for(self, count: int) -> list[bytes]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            got = self.messages()
            if len(got) >= count:
                return got
            time.sleep(0.01)
        raise AssertionError(f"expected {count} lines, got {self.messages()}")


@contextmanager
def running(target: Callable[[threading.Event], None]) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(WAIT)
        assert not thread.is_alive(), "the follower did not stop"


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def settle() -> None:
    time.sleep(0.15)  # more than one poll: the follower has looked at the file


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "sshd.log"
    path.write_bytes(b"old line before we started\n")
    return path


def test_follows_appended_lines_from_the_end(log_path: Path) -> None:
    got = Collected()
    with running(lambda stop: follow_file(log_path, got, stop, poll=0.02)):
        settle()
        append(log_path, b"first\r\nsecond\n")
        assert got.wait_for(2) == [b"first", b"second"]
    assert all(ln.pid is None and ln.time is None for ln in got.lines)


def test_from_start_reads_existing_lines(log_path: Path) -> None:
    got = Collected()
    with running(lambda stop: follow_file(log_path, got, stop, poll=0.02, from_start=True)):
        assert got.wait_for(1) == [b"old line before we started"]


def test_partial_line_waits_for_its_newline(log_path: Path) -> None:
    got = Collected()
    with running(lambda stop: follow_file(log_path, got, stop, poll=0.02)):
        settle()
        append(log_path, b"Accepted pub")
        settle()
        assert got.messages() == []
        append(log_path, b"lickey for bob\n")
        assert got.wait_for(1) == [b"Accepted publickey for bob"]


def test_rotation_reads_the_old_file_to_its_end_then_the_new_one(log_path: Path) -> None:
    got = Collected()
    with running(lambda stop: follow_file(log_path, got, stop, poll=0.05)):
        settle()
        append(log_path, b"one\n")
        got.wait_for(1)
        rotated = log_path.with_suffix(".log.1")
        log_path.rename(rotated)
        append(rotated, b"two, written to the old file after the rename\n")
        log_path.write_bytes(b"three, in the new file\n")
        assert got.wait_for(3) == [
            b"one",
            b"two, written to the old file after the rename",
            b"three, in the new file",
        ]
        append(log_path, b"four\n")
        assert got.wait_for(4)[-1] == b"four"


def test_lines_written_to_the_old_file_soon_after_rotation_are_not_lost(
    log_path: Path,
) -> None:
    got = Collected()
    with running(lambda stop: follow_file(log_path, got, stop, poll=0.02)):
        settle()
        rotated = log_path.with_suffix(".log.1")
        log_path.rename(rotated)
        log_path.write_bytes(b"new file\n")  # logrotate "create", before sshd is HUPed
        got.wait_for(1)
        append(rotated, b"sshd still writes the old file\n")
        assert sorted(got.wait_for(2)) == [b"new file", b"sshd still writes the old file"]


def test_truncation_restarts_at_the_beginning(log_path: Path) -> None:
    got = Collected()
    with running(lambda stop: follow_file(log_path, got, stop, poll=0.02)):
        settle()
        append(log_path, b"a fairly long line to make the file bigger\n")
        got.wait_for(1)
        with open(log_path, "r+b") as f:  # logrotate copytruncate
            f.truncate(0)
        settle()
        append(log_path, b"after\n")
        assert got.wait_for(2)[-1] == b"after"


def test_missing_file_is_waited_for(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "later.log"
    got = Collected()
    with (
        caplog.at_level(logging.WARNING, "sshaudit.agent.authfollow"),
        running(lambda stop: follow_file(path, got, stop, poll=0.02)),
    ):
        settle()
        path.write_bytes(b"hello\n")  # a new file: read from its start
        assert got.wait_for(1) == [b"hello"]
    assert "waiting for it" in caplog.text


def test_over_long_line_is_dropped_and_a_bad_handler_does_not_stop_us(log_path: Path) -> None:
    seen: list[bytes] = []

    def handler(line: LogLine) -> None:
        seen.append(line.message)
        if line.message == b"boom":
            raise RuntimeError("handler bug")

    with running(lambda stop: follow_file(log_path, handler, stop, poll=0.02)):
        settle()
        append(log_path, b"x" * (MAX_LINE * 3) + b"\nboom\nafter\n")
        deadline = time.monotonic() + WAIT
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen == [b"boom", b"after"]


def test_bad_poll() -> None:
    with pytest.raises(UsageError):
        follow_file("/nonexistent", lambda line: None, threading.Event(), poll=0)


# -- journald ------------------------------------------------------------------------------


def entry(message: object, pid: str = "4242", ts: str = "1795000000123456") -> bytes:
    return json.dumps({"MESSAGE": message, "_PID": pid, "__REALTIME_TIMESTAMP": ts}).encode()


def test_parse_journal_entry() -> None:
    line = parse_journal_entry(entry("Invalid user x from 1.2.3.4 port 5"))
    assert line is not None and line.message == b"Invalid user x from 1.2.3.4 port 5"
    assert line.pid == 4242
    assert line.time == datetime.fromtimestamp(1795000000.123456, tz=UTC)
    raw = parse_journal_entry(entry([73, 110, 255]))  # journald's form of non-UTF-8
    assert raw is not None and raw.message == b"In\xff"
    assert parse_journal_entry(entry("m", pid="x", ts="-1")) == LogLine(b"m", None, None)
    for bad in (b"not json", b"[1]", entry(None), entry([1, 300]), entry({"a": 1}), b"{}"):
        assert parse_journal_entry(bad) is None


def fake_journalctl(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "journalctl"
    script.write_text(f"#!{sys.executable}\nimport sys, time, os\n{body}\n")
    script.chmod(0o755)
    return [str(script), "-o", "json", "-f", "-n", "0"]


def test_journal_lines_and_restart_after_death(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    body = f"""
with open({str(runs)!r}, "a") as f:
    f.write("run\\n")
n = sum(1 for _ in open({str(runs)!r}))
msg = {{"MESSAGE": f"line {{n}}", "_PID": "7", "__REALTIME_TIMESTAMP": "1795000000000000"}}
sys.stdout.write(__import__("json").dumps(msg) + "\\n")
sys.stdout.write("garbage that is not json\\n")
sys.stdout.flush()
sys.exit(1)
"""
    argv = fake_journalctl(tmp_path, body)
    got = Collected()
    with running(lambda stop: follow_journal(got, stop, argv, backoff_start=0.05)):
        assert got.wait_for(3)[:3] == [b"line 1", b"line 2", b"line 3"]
    assert got.lines[0].pid == 7 and got.lines[0].time is not None


def test_journal_stop_ends_a_running_journalctl(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    body = f"""
open({str(pidfile)!r}, "w").write(str(os.getpid()))
print('{{"MESSAGE": "hello"}}', flush=True)
time.sleep(600)
"""
    got = Collected()
    argv = fake_journalctl(tmp_path, body)
    with running(lambda stop: follow_journal(got, stop, argv)):
        assert got.wait_for(1) == [b"hello"]
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # terminated and reaped


def test_missing_journalctl_is_retried_with_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    got = Collected()
    argv = [str(tmp_path / "no-such-journalctl")]
    with (
        caplog.at_level(logging.WARNING, "sshaudit.agent.authfollow"),
        running(lambda stop: follow_journal(got, stop, argv, backoff_start=0.01, backoff_max=0.04)),
    ):
        time.sleep(0.3)
    assert caplog.text.count("cannot run") >= 3
    assert got.messages() == []
    with pytest.raises(UsageError):
        follow_journal(got, threading.Event(), [], backoff_start=1)


# -- end to end: a real sshd -E log, followed while the attempts happen ---------------------


@pytest.mark.e2e
def test_real_sshd_log_to_events(sshd_server: SshdFactory, alice: UnixUser, tmp_path: Path) -> None:
    ca, user = tmp_path / "ca", tmp_path / "user"
    for key in (ca, user):
        run_checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], "keygen")
    run_checked(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", "alice@example.com", "-n", alice.name,
         "-z", "31", "-V", "20200101:20200102", f"{user}.pub"],
        "sign",
    )  # fmt: skip
    server = sshd_server(extra_lines=(f"TrustedUserCAKeys {ca}.pub",))
    merger = AuthMerger("e2e-host")
    events: list[dict[str, object]] = []
    lock = threading.Lock()

    def on_line(line: LogLine) -> None:
        obs = parse_line(line.message, datetime.now(UTC), line.pid)
        if obs is not None:
            with lock:
                events.extend(merger.add(obs))

    argv = [
        "ssh", "-F", "/dev/null", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", f"IdentityFile={user}", "-o", f"UserKnownHostsFile={server.known_hosts}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(server.port),
        "-l", alice.name, server.host, "true",
    ]  # fmt: skip
    with running(lambda stop: follow_file(server.log_path, on_line, stop, poll=0.05)):
        settle()
        done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        assert done.returncode == 255
        assert server.ssh(alice, "true").returncode == 0
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and len(events) < 2:
            time.sleep(0.05)
    with lock:
        got = [(e["unix_user"], e["allowed"], e["reason"], e["cert_serial"]) for e in events]
    assert got == [
        (alice.name, False, "certificate invalid: expired", 31),
        (alice.name, True, "", None),
    ], server.log()
