"""agent/daemon.py as an asyncio server on a temporary socket (in a thread of this process),
with a recorder stand-in speaking agent/protocol.py. The recorder peer check is injected
(this test process is not under sshd); the check itself is tested in test_daemon_peer.py."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    PRIV_PID,
    Client,
    DaemonThread,
    KeySet,
    cast_of,
    decrypt,
    make_config,
    make_keys,
    records,
    wait_for,
)

from sshaudit.agent import protocol
from sshaudit.agent.peer import Lineage, PeerCred, PeerError
from sshaudit.agent.protocol import MsgType, Stream
from sshaudit.asciicast import Code
from sshaudit.errors import ConfigError
from sshaudit.pam_module.hook import PAM_QUEUE_NAME
from sshaudit.sealed import Completeness, SignatureStatus


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def run(tmp_path: Path, keys: KeySet) -> Iterator[Callable[..., DaemonThread]]:
    started: list[DaemonThread] = []

    def start(daemon_kw: dict[str, Any] | None = None, **policy: Any) -> DaemonThread:
        d = DaemonThread(make_config(tmp_path, keys, **policy), **(daemon_kw or {})).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def test_shell_session_end_to_end(run: Callable[..., DaemonThread], keys: KeySet) -> None:
    d = run()
    sock = d.config.socket
    assert stat.S_IMODE(sock.stat().st_mode) == 0o666
    assert stat.S_IMODE(d.config.spool_dir.stat().st_mode) == 0o700
    c = d.client()
    reply = c.handshake()
    assert reply.type is MsgType.ACCEPT
    accept = reply.json()
    sid = accept["session_id"]
    assert accept == {
        "session_id": sid,
        "record_input": True,
        "exec_capture_cap": 1 << 20,
        "exec_hash": True,
    }
    # ACCEPT comes after the header is on disk
    record = d.record(sid)
    assert record["recording_status"] == "recording" and record["unix_user"] == "jdoe"
    assert record["spool"]["priv_pid"] == PRIV_PID
    c.data(Stream.OUTPUT, b"$ ")
    c.data(Stream.INPUT, b"echo hi\r")
    c.send(protocol.encode_resize(c.now(), 132, 43))
    c.send(protocol.encode_marker(c.now(), "input hidden (echo off): 4 bytes"))
    c.data(Stream.OUTPUT, b"hi\r\n")
    done = c.end(exit_status=0, bytes_in=8, bytes_out=6)
    assert done is not None and done.type is MsgType.DONE
    assert done.json() == {"session_id": sid}
    c.close()
    plain, result = decrypt(d.sealed(sid), keys.auditor)
    assert result.completeness is Completeness.COMPLETE
    assert result.signature is SignatureStatus.VALID
    header, events = cast_of(plain)
    assert header.extra["sshaudit"]["session_id"] == sid
    assert header.title is not None and header.title.startswith("jdoe@")
    assert [(e.code, e.data) for e in events] == [
        (Code.OUTPUT, "$ "),
        (Code.INPUT, "echo hi\r"),
        (Code.RESIZE, "132x43"),
        (Code.MARKER, "input hidden (echo off): 4 bytes"),
        (Code.OUTPUT, "hi\r\n"),
        (Code.MARKER, "sshaudit: exit status 0"),
    ]
    record = d.record(sid)
    assert record["recording_status"] == "complete" and record["exit_status"] == 0
    assert record["spool"]["state"] == "closed" and record["session_finish"]
    assert (record["bytes_in"], record["bytes_out"]) == (8, 6)
    assert record["client_address"] == "192.0.2.10" and record["target_id"] == "web-1"
    assert record["spool"]["frames"] == result.frames
    for path in d.config.spool_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_frames_reach_disk_within_frame_interval(
    run: Callable[..., DaemonThread], keys: KeySet
) -> None:
    d = run(frame_interval=0.2)
    c = d.client()
    sid = c.handshake().json()["session_id"]
    c.data(Stream.OUTPUT, b"typed and waiting")

    def on_disk() -> bool:
        plain, result = decrypt(d.sealed(sid), keys.auditor)
        return b"typed and waiting" in plain and result.completeness is Completeness.TRUNCATED

    started = time.monotonic()
    wait_for(on_disk, timeout=5)
    assert time.monotonic() - started < 2.0  # cut by the timer, not by the end
    c.end()
    c.close()


def test_large_output_is_cut_by_size_and_intact(
    run: Callable[..., DaemonThread], keys: KeySet
) -> None:
    d = run(frame_max_bytes=65536, frame_interval=30.0)
    c = d.client()
    sid = c.handshake(program_type="exec", command="cat big", pty=False).json()["session_id"]
    chunk = bytes(range(32, 127)) * 690  # ~64 KiB of ASCII
    for _ in range(40):
        c.data(Stream.OUTPUT, chunk)
    assert c.end().type is MsgType.DONE  # type: ignore[union-attr]
    c.close()
    plain, result = decrypt(d.sealed(sid), keys.auditor)
    _, events = cast_of(plain)
    assert "".join(e.data for e in events if e.code is Code.OUTPUT) == chunk.decode() * 40
    assert result.frames >= 40  # size cuts: at most one interval would be one frame


def test_recorder_lost_leaves_truncated_file_and_record(
    run: Callable[..., DaemonThread], keys: KeySet
) -> None:
    d = run(frame_interval=30.0)
    c = d.client()
    sid = c.handshake().json()["session_id"]
    c.data(Stream.OUTPUT, b"last words")
    c.close()  # killed: no END
    rec = wait_for(lambda: (r := d.record(sid))["recording_status"] != "recording" and r)
    assert rec["recording_status"] == "recorder_lost"
    assert "without ending" in rec["error"] and rec["spool"]["state"] == "closed"
    plain, result = decrypt(d.sealed(sid), keys.auditor)
    assert result.completeness is Completeness.TRUNCATED
    assert b"last words" in plain  # pending plaintext was sealed, not lost


def test_peer_refused(run: Callable[..., DaemonThread]) -> None:
    def refuse(cred: PeerCred) -> Lineage:
        raise PeerError(f"pid {cred.pid}: not started by an sshd session process")

    d = run({"ancestry": refuse})
    c = d.client()
    reply = c.handshake()
    assert reply.type is MsgType.REFUSE
    assert "not started by sshd" in reply.json()["reason"]
    assert c.recv() is None  # and the daemon hangs up
    assert list(d.config.spool_dir.iterdir()) == []


def test_spool_full_refuses_new_sessions(run: Callable[..., DaemonThread]) -> None:
    d = run(spool_max_bytes=1 << 20)
    (d.config.spool_dir / "filler.sealed").write_bytes(b"\0" * (1 << 20))
    reply = d.client().handshake()
    assert reply.type is MsgType.REFUSE and reply.json()["reason"] == "the recording spool is full"


def test_malformed_peers_do_not_hurt_the_daemon(run: Callable[..., DaemonThread]) -> None:
    d = run()
    for junk in (b"\xff" * 10, protocol.encode(MsgType.DATA, b"x" * 20), b""):
        c = d.client()
        c.send(junk)
        if not junk:
            c.sock.shutdown(socket.SHUT_WR)
        assert c.recv() is None
        c.close()
    bad_hello = d.client()
    bad_hello.send_json(MsgType.HELLO, {"version": 99})
    reply = bad_hello.recv()
    assert reply is not None and reply.type is MsgType.REFUSE
    c = d.client()
    sid = c.handshake().json()["session_id"]
    c.send(protocol.encode(MsgType.RESIZE, b"short"))  # a protocol error mid-session
    assert c.recv() is None
    rec = wait_for(lambda: (r := d.record(sid))["recording_status"] != "recording" and r)
    assert rec["recording_status"] == "recorder_lost" and "protocol error" in rec["error"]
    assert d.client().handshake().type is MsgType.ACCEPT  # still serving


def test_silent_peer_is_dropped_after_the_hello_timeout(run: Callable[..., DaemonThread]) -> None:
    d = run({"hello_timeout": 0.3})
    c = d.client()
    started = time.monotonic()
    assert c.recv() is None
    assert time.monotonic() - started < 3


def pam(c: Client, phase: str, priv_pid: int, user: str = "jdoe") -> protocol.Message | None:
    doc = {
        "phase": phase,
        "user": user,
        "rhost": "198.51.100.7",
        "service": "sshd",
        "tty": "ssh",
        "priv_pid": priv_pid,
    }
    c.send_json(MsgType.PAM, doc)
    return c.recv()


def test_pam_session_without_recorder_is_unrecorded(run: Callable[..., DaemonThread]) -> None:
    d = run(reconcile_grace=0.3)
    reply = pam(d.client(), "open_session", PRIV_PID)
    assert reply is not None and reply.type is MsgType.DONE
    (rec,) = wait_for(lambda: records(d))
    assert rec["recording_status"] == "unrecorded" and rec["unix_user"] == "jdoe"
    assert rec["client_address"] == "198.51.100.7" and rec["session_finish"] is None
    assert rec["spool"]["state"] == "none" and "no recorder connected" in rec["error"]
    pam(d.client(), "close_session", PRIV_PID)
    wait_for(lambda: records(d)[0]["session_finish"])


def test_pam_session_with_recorder_is_not_unrecorded(run: Callable[..., DaemonThread]) -> None:
    d = run(reconcile_grace=0.3)
    pam(d.client(), "open_session", PRIV_PID)
    c = d.client()
    sid = c.handshake().json()["session_id"]
    time.sleep(0.6)
    c.close()  # the recorder is killed while the SSH session is open
    rec = wait_for(lambda: (r := d.record(sid))["recording_status"] != "recording" and r)
    assert rec["recording_status"] == "recorder_lost"
    assert "while its SSH session was open" in rec["error"]
    pam(d.client(), "close_session", PRIV_PID)
    time.sleep(0.3)
    assert [r["session_id"] for r in records(d)] == [sid]  # no unrecorded record


def test_pam_from_a_non_root_peer_is_ignored(run: Callable[..., DaemonThread]) -> None:
    def not_root(cred: PeerCred) -> None:
        raise PeerError(f"pid {cred.pid}: a PAM message from uid 1000, not root")

    d = run({"pam_check": not_root}, reconcile_grace=0.1)
    assert pam(d.client(), "open_session", 99) is None
    time.sleep(0.4)
    assert records(d) == []


def test_queued_pam_events_become_records_at_start(
    tmp_path: Path, keys: KeySet, run: Callable[..., DaemonThread]
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    lines = [
        {
            "phase": "open_session",
            "user": "ann",
            "rhost": "203.0.113.5",
            "service": "sshd",
            "tty": "ssh",
            "priv_pid": 31,
            "time": "2026-11-22T09:00:00Z",
        },
        {
            "phase": "close_session",
            "user": "ann",
            "rhost": "203.0.113.5",
            "service": "sshd",
            "tty": "ssh",
            "priv_pid": 31,
            "time": "2026-11-22T09:05:00Z",
        },
    ]
    (spool / PAM_QUEUE_NAME).write_text("".join(json.dumps(x) + "\n" for x in lines))
    d = run()
    (rec,) = records(d)
    assert rec["recording_status"] == "unrecorded" and rec["unix_user"] == "ann"
    assert rec["session_start"] == "2026-11-22T09:00:00Z"
    assert rec["session_finish"] == "2026-11-22T09:05:00Z"
    assert "daemon was down" in rec["error"]
    assert not (spool / PAM_QUEUE_NAME).exists()


def test_fifty_concurrent_sessions(run: Callable[..., DaemonThread], keys: KeySet) -> None:
    d = run(frame_interval=0.1)

    def one(i: int) -> str:
        c = d.client()
        sid: str = c.handshake().json()["session_id"]
        for j in range(20):
            c.data(Stream.OUTPUT, f"session {i} line {j}\n".encode())
            time.sleep(0.005)
        assert c.end().type is MsgType.DONE  # type: ignore[union-attr]
        c.close()
        return sid

    with ThreadPoolExecutor(50) as pool:
        sids = list(pool.map(one, range(50)))
    assert len(set(sids)) == 50
    for i, sid in enumerate(sids):
        plain, result = decrypt(d.sealed(sid), keys.auditor)
        assert result.completeness is Completeness.COMPLETE
        text = "".join(e.data for e in cast_of(plain)[1] if e.code is Code.OUTPUT)
        assert text == "".join(f"session {i} line {j}\n" for j in range(20))
        assert d.record(sid)["recording_status"] == "complete"


def test_stop_ends_open_sessions_as_truncated(tmp_path: Path, keys: KeySet) -> None:
    d = DaemonThread(make_config(tmp_path, keys, frame_interval=30.0)).start()
    c = d.client()
    sid = c.handshake().json()["session_id"]
    c.data(Stream.OUTPUT, b"until the stop")
    time.sleep(0.1)
    d.stop()
    assert c.recv() is None
    rec = d.record(sid)
    assert rec["recording_status"] == "truncated" and "daemon stopped" in rec["error"]
    plain, result = decrypt(d.sealed(sid), keys.auditor)
    assert result.completeness is Completeness.TRUNCATED and b"until the stop" in plain
    assert not d.config.socket.exists()


def test_a_second_daemon_on_the_same_socket_is_refused(
    tmp_path: Path, keys: KeySet, run: Callable[..., DaemonThread]
) -> None:
    run()
    with pytest.raises(ConfigError, match="already listening"):
        DaemonThread(make_config(tmp_path, keys)).start()


def test_a_stale_socket_is_replaced_and_bad_paths_refused(tmp_path: Path, keys: KeySet) -> None:
    config = make_config(tmp_path, keys)
    config.socket.parent.mkdir(mode=0o755)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(config.socket))
    stale.close()  # bound, never listening: what a killed daemon leaves
    d = DaemonThread(config).start()
    assert d.client().handshake().type is MsgType.ACCEPT
    d.stop()
    config.socket.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        DaemonThread(config).start()
    config.socket.unlink()
    config.socket.parent.chmod(0o777)
    with pytest.raises(ConfigError, match="not writable by group or others"):
        DaemonThread(config).start()


def test_loose_spool_dir_stops_the_start(tmp_path: Path, keys: KeySet) -> None:
    config = make_config(tmp_path, keys)
    config.spool_dir.mkdir(mode=0o755)
    config.spool_dir.chmod(0o755)
    with pytest.raises(ConfigError, match="must be 0700"):
        DaemonThread(config).start()
    assert not config.socket.exists()
    os.sync()


@pytest.fixture
def tiny_spool(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs as the spool, to fill the disk for real (needs root and mount)."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(spool)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"DISK-FULL TEST NOT RUN: cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_disk_full_ends_the_recording_but_not_the_daemon(
    tiny_spool: Path, run: Callable[..., DaemonThread], keys: KeySet, caplog: Any
) -> None:
    d = run(frame_max_bytes=4096)
    c = d.client()
    sid = c.handshake().json()["session_id"]
    with pytest.raises(OSError):  # the daemon hangs up once the disk is full
        for _ in range(400):
            c.data(Stream.OUTPUT, b"z" * 4000)
        while c.recv() is not None:
            pass
        raise BrokenPipeError("the daemon closed the connection")
    wait_for(lambda: "writing the spool failed" in caplog.text)
    plain, result = decrypt(d.sealed(sid), keys.auditor)
    assert result.completeness is Completeness.TRUNCATED and len(plain) > 100_000
    reply = pam(d.client(), "account", PRIV_PID)
    assert reply is not None and reply.type is MsgType.DONE  # still serving
