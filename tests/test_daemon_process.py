"""The daemon as a real process: SIGKILL mid-session (the frames on disk decrypt as truncated;
the restarted daemon finishes the bookkeeping), SIGTERM (exit 0, sessions truncated), and the
``sshaudit-agent`` command line (daemon start-up errors, spool list, record delegation, help).

The recorder peer check is replaced through ``run_daemon(ancestry=...)`` in a small launcher
script (this test process is not under sshd); everything else is the production path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import Client, KeySet, config_doc, decrypt, make_keys, toml_text

from sshaudit.agent.protocol import MsgType, Stream
from sshaudit.sealed import Completeness

PY = sys.executable
AGENT = str(Path(PY).parent / "sshaudit-agent")
LAUNCH = """
import sys
from sshaudit.agent.daemon import run_daemon
from sshaudit.agent.peer import Lineage
raise SystemExit(run_daemon(sys.argv[1], "debug",
    ancestry=lambda cred: Lineage("jdoe", cred.uid, int(sys.argv[2]), 1)))
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def config(tmp_path: Path, keys: KeySet) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(toml_text(config_doc(tmp_path, keys, frame_interval=0.2)))
    return path


class Proc:
    def __init__(self, config: Path, tmp: Path) -> None:
        self.tmp = tmp
        self.log = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.socket = tmp / "run" / "agent.sock"
        with self.log.open("wb") as err:
            self.p = subprocess.Popen([PY, "-c", LAUNCH, str(config), str(os.getpid())], stderr=err)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "listening on" in self.log.read_text():
                return
            if self.p.poll() is not None:
                raise AssertionError(f"daemon exited: {self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError("daemon did not start")

    def record(self, sid: str) -> dict[str, object]:
        doc: dict[str, object] = json.loads((self.tmp / "spool" / f"{sid}.json").read_text())
        return doc

    def sealed(self, sid: str) -> bytes:
        return (self.tmp / "spool" / f"{sid}.sealed").read_bytes()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    out: list[Proc] = []
    yield out
    for p in out:
        p.stop()


def start(config: Path, tmp: Path, procs: list[Proc]) -> Proc:
    proc = Proc(config, tmp)
    procs.append(proc)
    return proc


def test_sigkill_mid_session_then_restart(
    config: Path, tmp_path: Path, keys: KeySet, procs: list[Proc]
) -> None:
    d = start(config, tmp_path, procs)
    c = Client(d.socket)
    sid = c.handshake().json()["session_id"]
    c.data(Stream.OUTPUT, b"before the daemon died\r\n")
    deadline = time.monotonic() + 10
    while b"before the daemon died" not in decrypt(d.sealed(sid), keys.auditor)[0]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    d.p.send_signal(signal.SIGKILL)
    d.p.wait(10)
    assert c.recv() is None  # the recorder sees the daemon gone (and follows its policy)
    plain, result = decrypt(d.sealed(sid), keys.auditor)
    assert result.completeness is Completeness.TRUNCATED
    assert b"before the daemon died" in plain
    assert d.record(sid)["recording_status"] == "recording"  # nobody finished it yet
    assert d.socket.exists()  # a stale socket is left behind
    d2 = start(config, tmp_path, procs)  # replaces the stale socket
    rec = d2.record(sid)
    assert rec["recording_status"] == "truncated"
    assert rec["spool"]["state"] == "closed"  # type: ignore[index]
    assert rec["session_finish"] and "daemon stopped" in str(rec["error"])
    assert "closed after a daemon restart" in d2.log.read_text()
    c2 = Client(d2.socket)
    assert c2.handshake().type is MsgType.ACCEPT  # and it serves again


def test_sigterm_truncates_open_sessions_and_exits_0(
    config: Path, tmp_path: Path, keys: KeySet, procs: list[Proc]
) -> None:
    d = start(config, tmp_path, procs)
    c = Client(d.socket)
    sid = c.handshake().json()["session_id"]
    c.data(Stream.OUTPUT, b"still typing")
    time.sleep(0.1)
    d.p.send_signal(signal.SIGTERM)
    assert d.p.wait(15) == 0
    rec = d.record(sid)
    assert rec["recording_status"] == "truncated"
    plain, result = decrypt(d.sealed(sid), keys.auditor)
    assert result.completeness is Completeness.TRUNCATED and b"still typing" in plain
    assert not d.socket.exists()
    log = d.log.read_text()
    assert "accepted" in log and "truncated" in log and "Traceback" not in log


def agent(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_daemon_start_errors_are_one_line(tmp_path: Path, keys: KeySet) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('host_id = "x"\n')
    r = agent("daemon", "--config", str(bad))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"sshaudit-agent: config {bad}: "
        "recipients: at least one auditor public key (or recipients_dir)"
    )
    assert "Traceback" not in r.stderr
    doc = config_doc(tmp_path, keys)
    (tmp_path / "spool").mkdir(mode=0o755)
    (tmp_path / "spool").chmod(0o755)
    loose = tmp_path / "loose.toml"
    loose.write_text(toml_text(doc))
    r = agent("daemon", "--config", str(loose))
    assert r.returncode == 1 and "must be 0700" in r.stderr and "Traceback" not in r.stderr
    r = agent("daemon", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 1 and "cannot read config" in r.stderr


def test_cli_usage_and_help() -> None:
    r = agent()
    assert r.returncode == 2 and "usage: sshaudit-agent" in r.stderr
    r = agent("--help")
    assert r.returncode == 0 and "record" in r.stdout and "daemon" in r.stdout
    r = agent("daemon", "--help")
    assert r.returncode == 0 and "--config FILE" in r.stdout and "SIGTERM" in r.stdout
    r = agent("spool", "list", "--help")
    assert r.returncode == 0 and "--json" in r.stdout
    r = agent("daemon")
    assert r.returncode == 2 and "--config" in r.stderr


def test_cli_record_delegates_to_the_recorder() -> None:
    r = agent("record", "--help")
    assert r.returncode == 0, r.stderr
    assert "sshaudit-agent record" in r.stdout + r.stderr


def test_cli_module_imports_nothing_heavy() -> None:
    code = (
        "import sys; import sshaudit.agent.cli; "
        "heavy = {'pydantic', 'cryptography', 'psutil', 'asyncio', 'pyhpke', 'json'}; "
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_cli_spool_list(config: Path, tmp_path: Path, keys: KeySet, procs: list[Proc]) -> None:
    d = start(config, tmp_path, procs)
    c = Client(d.socket)
    sid = c.handshake().json()["session_id"]
    c.data(Stream.OUTPUT, b"x")
    assert c.end().type is MsgType.DONE  # type: ignore[union-attr]
    c2 = Client(d.socket)
    sid2 = c2.handshake().json()["session_id"]
    r = agent("spool", "list", "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["session_id"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert rows[sid]["recording_status"] == "complete" and rows[sid]["closed_file"]
    assert rows[sid]["frames"] >= 2 and rows[sid]["unix_user"] == "jdoe"
    assert rows[sid2]["recording_status"] == "recording"
    assert rows[sid2]["spool_state"] == "writing" and not rows[sid2]["closed_file"]
    table = agent("spool", "list", "--config", str(config))
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    header = ["SESSION", "USER", "START", "STATUS", "SPOOL", "FRAMES", "BYTES", "SHIPPED"]
    assert lines[0].split() == header
    assert any(line.startswith(sid) and "complete" in line for line in lines[1:])
    c2.close()


def test_cli_spool_list_errors(tmp_path: Path) -> None:
    r = agent("spool", "list", "--config", str(tmp_path / "none.toml"))
    assert r.returncode == 1 and r.stderr.startswith("sshaudit-agent: cannot read config")
