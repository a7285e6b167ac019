"""agent/session.py: protocol values in, sealed asciicast out, decrypted with the project
reader; frame cutting by size and by time; HELLO/END validation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import KeySet, cast_of, decrypt, end_doc, frame_lengths, hello, make_keys

from sshaudit.agent import protocol
from sshaudit.agent.protocol import Data, Marker, ProtocolError, Resize, Stream
from sshaudit.agent.session import (
    EndInfo,
    Endpoints,
    Hello,
    ProgramType,
    RecordingSession,
    SessionMeta,
    final_record,
)
from sshaudit.agent.spool import RecordingStatus, SpoolState
from sshaudit.agent.sshcert import AuthInfo, Certificate
from sshaudit.asciicast import Code
from sshaudit.sealed import Completeness, SignatureStatus

WHEN = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
SID = "6f1f0a52-3a52-4d7e-9c61-2f4d8e7a1b00"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return make_keys(tmp_path_factory.mktemp("keys"))


def meta(**hello_over: Any) -> SessionMeta:
    cert = Certificate(
        key_type="ssh-ed25519-cert-v01@openssh.com",
        serial=42,
        cert_type=1,
        key_id="jdoe@example.com",
        principals=("jdoe", "ops"),
        valid_after=0,
        valid_before=2**64 - 1,
        fingerprint="SHA256:abc",
        ca_fingerprint="SHA256:ca",
    )
    return SessionMeta(
        session_id=SID,
        target_id="web-1",
        hostname="web-1.example",
        unix_user="jdoe",
        uid=1000,
        priv_pid=4242,
        started_at=WHEN,
        hello=Hello.from_json(hello(**hello_over)),
        auth=AuthInfo("ssh-ed25519-cert-v01@openssh.com", "SHA256:abc", cert),
    )


def due(s: RecordingSession) -> float | None:
    return s.deadline  # read afresh each time (mypy would narrow a property once)


def session(keys: KeySet, m: SessionMeta | None = None, **kw: Any) -> RecordingSession:
    args: dict[str, Any] = {"frame_max_bytes": 1024, "frame_interval": 1.0, "record_input": True}
    args.update(kw)
    return RecordingSession(
        m or meta(), recipients=(keys.auditor.public,), host_key=keys.host, **args
    )


def test_a_whole_session_decrypts_signed_with_header_events_and_end_marker(keys: KeySet) -> None:
    s = session(keys)
    out = s.start(0.0)
    out += s.data(Data(0.1, Stream.OUTPUT, b"$ "), 0.1)
    out += s.data(Data(0.2, Stream.INPUT, b"ls\r"), 0.2)
    out += s.resize(Resize(0.3, 120, 40), 0.3)
    out += s.marker(Marker(0.4, "input hidden (echo off): 7 bytes"), 0.4)
    out += s.data(Data(0.5, Stream.OUTPUT, "héllo\r\n".encode()), 0.5)
    out += s.end(EndInfo.from_json(end_doc(exit_status=3)), 0.6)
    plain, result = decrypt(out, keys.auditor)
    assert result.completeness is Completeness.COMPLETE
    assert result.signature is SignatureStatus.VALID
    assert result.header.session_id == SID and result.header.host_id == "web-1"
    header, events = cast_of(plain)
    assert (header.width, header.height) == (100, 30)
    assert header.timestamp == int(WHEN.timestamp())
    assert header.env == {"TERM": "xterm-256color", "SHELL": "/bin/bash"}
    assert header.title == "jdoe@web-1.example"
    assert header.command is None  # a shell session has no command
    info = header.extra["sshaudit"]
    assert info["user_email"] == "jdoe@example.com" and info["cert_serial"] == 42
    assert info["principal"] == "jdoe" and info["client_address"] == "192.0.2.10"
    assert info["client_port"] == 50022 and info["server_port"] == 22
    assert info["program_type"] == "shell" and info["session_start"] == "2026-11-22T10:00:00Z"
    assert [(e.code, e.data) for e in events] == [
        (Code.OUTPUT, "$ "),
        (Code.INPUT, "ls\r"),
        (Code.RESIZE, "120x40"),
        (Code.MARKER, "input hidden (echo off): 7 bytes"),
        (Code.OUTPUT, "héllo\r\n"),
        (Code.MARKER, "sshaudit: exit status 3"),
    ]
    assert [e.time for e in events][:5] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert s.bytes_in == 3 and s.bytes_out == 2 + len("héllo\r\n".encode())
    assert s.sealed_bytes == len(out)


def test_exec_header_has_the_command_and_stderr_is_output(keys: KeySet) -> None:
    m = meta(program_type="exec", command="cat /etc/hostname", pty=False, width=0, height=None)
    s = session(keys, m)
    out = s.start(0.0) + s.data(Data(0.1, Stream.ERROR, b"oops\n"), 0.1)
    out += s.data(Data(0.2, Stream.OUTPUT, b"web-1\n"), 0.2)
    out += s.end(EndInfo.from_json(end_doc()), 0.3)
    header, events = cast_of(decrypt(out, keys.auditor)[0])
    assert header.command == "cat /etc/hostname"
    assert (header.width, header.height) == (80, 24)  # no pty: a default size
    assert [(e.code, e.data) for e in events][:2] == [
        (Code.OUTPUT, "oops\n"),
        (Code.OUTPUT, "web-1\n"),
    ]


def test_stdout_and_stderr_keep_split_utf8_sequences_apart(keys: KeySet) -> None:
    s = session(keys, meta(program_type="exec", command="x", pty=False))
    e_acute = "é".encode()
    out = s.start(0.0)
    out += s.data(Data(0.1, Stream.OUTPUT, b"a" + e_acute[:1]), 0.1)
    out += s.data(Data(0.2, Stream.ERROR, b"err" + e_acute[:1]), 0.2)
    out += s.data(Data(0.3, Stream.OUTPUT, e_acute[1:] + b"b"), 0.3)
    out += s.data(Data(0.4, Stream.ERROR, e_acute[1:]), 0.4)
    out += s.end(EndInfo.from_json(end_doc()), 0.5)
    _, events = cast_of(decrypt(out, keys.auditor)[0])
    outputs = [e.data for e in events if e.code is Code.OUTPUT]
    assert outputs == ["a", "err", "éb", "é"]  # no U+FFFD: each stream decoded on its own


def test_event_times_never_go_back(keys: KeySet) -> None:
    s = session(keys)
    out = s.start(0.0) + s.data(Data(2.0, Stream.OUTPUT, b"x"), 0.0)
    out += s.data(Data(1.0, Stream.ERROR, b"y"), 0.0)  # stderr read a little later
    out += s.end(EndInfo.from_json(end_doc()), 0.0)
    _, events = cast_of(decrypt(out, keys.auditor)[0])
    times = [e.time for e in events]
    assert times == sorted(times) and times[1] == 2.0


def test_input_is_dropped_when_policy_says_so(keys: KeySet) -> None:
    s = session(keys, record_input=False)
    out = s.start(0.0) + s.data(Data(0.1, Stream.INPUT, b"secret"), 0.1)
    out += s.data(Data(0.2, Stream.OUTPUT, b"ok"), 0.2) + s.end(EndInfo.from_json(end_doc()), 0.3)
    plain, _ = decrypt(out, keys.auditor)
    assert b"secret" not in plain and s.bytes_in == 6
    assert all(e.code is not Code.INPUT for e in cast_of(plain)[1])


def test_frames_are_cut_at_frame_max_bytes(keys: KeySet) -> None:
    s = session(keys, frame_max_bytes=1024, frame_interval=100.0)
    out = s.start(0.0)
    frames_after_start = s.frames
    small = s.data(Data(0.1, Stream.OUTPUT, b"a" * 100), 0.1)
    assert small == b"" and due(s) == 100.1  # pending, not yet due
    big = s.data(Data(0.2, Stream.OUTPUT, b"b" * 2000), 0.2)
    assert big and s.frames == frames_after_start + 1 and due(s) is None
    out += small + big + s.end(EndInfo.from_json(end_doc()), 0.3)
    lengths = frame_lengths(out)
    assert len(lengths) == s.frames == frames_after_start + 2
    assert lengths[1] - 16 >= 1024  # the size cut holds at least frame_max_bytes


def test_frames_are_cut_after_frame_interval_via_tick(keys: KeySet) -> None:
    s = session(keys, frame_max_bytes=65536, frame_interval=1.0)
    out = s.start(10.0)
    n = s.frames
    out += s.data(Data(0.1, Stream.OUTPUT, b"x"), 10.0)
    assert due(s) == 11.0
    assert s.tick(10.5) == b"" and s.frames == n
    assert s.data(Data(0.2, Stream.OUTPUT, b"y"), 10.9) == b""  # the oldest byte decides
    cut = s.tick(11.0)
    assert cut and s.frames == n + 1 and due(s) is None
    assert s.tick(50.0) == b""  # nothing pending: an idle session writes nothing
    # an append arriving after the deadline cuts at once, without waiting for a tick
    assert s.data(Data(0.3, Stream.OUTPUT, b"z"), 60.0) == b""
    assert s.data(Data(0.4, Stream.OUTPUT, b"w"), 61.5) != b""
    out += cut


def test_abandon_leaves_a_truncated_file_with_everything_received(keys: KeySet) -> None:
    s = session(keys, frame_interval=100.0, frame_max_bytes=65536)
    out = s.start(0.0) + s.data(Data(0.1, Stream.OUTPUT, b"before the kill"), 0.1)
    out += s.abandon()
    plain, result = decrypt(out, keys.auditor)
    assert result.completeness is Completeness.TRUNCATED
    assert result.signature is SignatureStatus.ABSENT
    assert [e.data for e in cast_of(plain)[1]] == ["before the kill"]
    assert s.abandon() == b""
    with pytest.raises(ProtocolError):
        s.data(Data(0.2, Stream.OUTPUT, b"late"), 0.2)


def test_end_markers_name_capped_streams_and_signals(keys: KeySet) -> None:
    s = session(keys, meta(program_type="exec", command="cat", pty=False))
    digest = "ab" * 32
    end = end_doc(
        exit_status=None,
        signal=15,
        streams={"stdout": {"bytes": 5000, "captured": 1024, "sha256": digest}},
        error="relay failed",
    )
    out = s.start(0.0) + s.end(EndInfo.from_json(end), 0.1)
    _, events = cast_of(decrypt(out, keys.auditor)[0])
    labels = [e.data for e in events if e.code is Code.MARKER]
    assert labels == [
        f"sshaudit: stdout: 5000 bytes, first 1024 recorded, sha256 {digest}",
        "sshaudit: killed by signal 15",
        "sshaudit: error: relay failed",
    ]


def test_feed_dispatches_protocol_messages(keys: KeySet) -> None:
    s = session(keys)
    out = s.start(0.0)
    for raw in (
        protocol.encode_data(0.1, Stream.OUTPUT, b"hi"),
        protocol.encode_resize(0.2, 90, 20),
        protocol.encode_marker(0.3, "m"),
    ):
        (msg,) = protocol.Decoder().feed(raw)
        out += s.feed(msg, 0.3)
    (hello_msg,) = protocol.Decoder().feed(protocol.encode_json(protocol.MsgType.HELLO, {}))
    with pytest.raises(ProtocolError):
        s.feed(hello_msg, 0.3)
    out += s.end(EndInfo.from_json(end_doc()), 0.4)
    _, events = cast_of(decrypt(out, keys.auditor)[0])
    assert [e.data for e in events][:3] == ["hi", "90x20", "m"]


def test_final_record_prefers_the_recorders_counts(keys: KeySet) -> None:
    m = meta(program_type="exec", command="cat", pty=False)
    s = session(keys, m)
    s.start(0.0)
    s.data(Data(0.1, Stream.OUTPUT, b"abc"), 0.1)
    start = m.record()
    assert start.recording_status is RecordingStatus.RECORDING
    assert start.spool_state is SpoolState.WRITING and start.priv_pid == 4242
    s.end(EndInfo.from_json(end_doc(bytes_in=10, bytes_out=7000, bytes_err=5, signal=9)), 0.2)
    end = EndInfo.from_json(end_doc(bytes_in=10, bytes_out=7000, bytes_err=5, signal=9))
    rec = final_record(
        start, s, status=RecordingStatus.COMPLETE, error=None, end=end, finished_at=WHEN
    )
    assert (rec.bytes_in, rec.bytes_out) == (10, 7005)
    assert rec.details["signal"] == 9 and rec.spool_state is SpoolState.CLOSED
    assert rec.frames == s.frames and rec.session_finish == "2026-11-22T10:00:00Z"
    lost = final_record(
        start, s, status=RecordingStatus.RECORDER_LOST, error="gone", end=None, finished_at=WHEN
    )
    assert (lost.bytes_in, lost.bytes_out, lost.error) == (0, 3, "gone")
    assert lost.to_json()["cert_fingerprint"] == "SHA256:abc"


@pytest.mark.parametrize(
    "over",
    [
        {"version": 2},
        {"version": True},
        {"program_type": "tunnel"},
        {"pty": "yes"},
        {"width": -1},
        {"width": 70000},
        {"height": 1.5},
        {"term": 5},
        {"command": "x" * 300_000},
        {"ssh_user_auth": "x" * 70_000},
    ],
)
def test_bad_hello_is_a_protocol_error(over: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        Hello.from_json(hello(**over))


@pytest.mark.parametrize(
    "over",
    [
        {"exit_status": "0"},
        {"signal": 1 << 20},
        {"bytes_in": -1},
        {"streams": []},
        {"streams": {"fd3": {}}},
        {"streams": {"stdout": {"sha256": "XYZ"}}},
        {"streams": {"stdout": {"bytes": True}}},
        {"error": 3},
    ],
)
def test_bad_end_is_a_protocol_error(over: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        EndInfo.from_json(end_doc(**over))


def test_endpoints_parse_and_tolerate_garbage() -> None:
    assert Endpoints.parse("::1 5000 ::1 22") == Endpoints("::1", 5000, "::1", 22)
    assert Endpoints.parse("garbage") == Endpoints()
    assert Endpoints.parse("a b c d") == Endpoints()


def test_program_type_values() -> None:
    assert {p.value for p in ProgramType} == {"shell", "exec", "subsystem"}


def test_many_frames_decrypt_in_order(keys: KeySet, tmp_path: Path) -> None:
    s = session(keys, frame_max_bytes=1024, frame_interval=0.5)
    out = s.start(0.0)
    expected = []
    for i in range(200):
        chunk = f"line {i}\r\n".encode() * 20
        expected.append(chunk.decode())
        out += s.data(Data(i * 0.01, Stream.OUTPUT, chunk), i * 0.3)
    out += s.end(EndInfo.from_json(end_doc()), 100.0)
    plain, result = decrypt(out, keys.auditor)
    assert result.completeness is Completeness.COMPLETE and result.frames > 20
    outputs = [e.data for e in cast_of(plain)[1] if e.code is Code.OUTPUT]
    assert outputs == expected
