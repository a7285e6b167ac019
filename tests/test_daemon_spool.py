"""agent/spool.py: directory and file modes, atomic records, scanning, recovery after a
crash, the size cap policies, the PAM queue, and ``list_spool``."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from daemon_helpers import KeySet, decrypt, make_keys

from sshaudit.agent.config import OnSpoolFull
from sshaudit.agent.spool import (
    RecordingStatus,
    SessionRecord,
    Spool,
    SpoolState,
    list_spool,
    prepare_spool_dir,
    read_record,
    scan_sealed,
)
from sshaudit.errors import ConfigError, SealedFormatError
from sshaudit.pam_module.hook import PAM_QUEUE_NAME
from sshaudit.sealed import Completeness, SealedWriter

WHEN = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return make_keys(tmp_path_factory.mktemp("keys"))


def spool(
    tmp_path: Path, max_bytes: int = 1 << 30, on_full: OnSpoolFull = OnSpoolFull.REFUSE
) -> Spool:
    s = Spool(tmp_path / "spool", max_bytes=max_bytes, on_full=on_full)
    s.prepare()
    return s


def sealed_bytes(keys: KeySet, sid: str, n_frames: int, close: bool) -> bytes:
    w = SealedWriter(
        recipients=[keys.auditor.public],
        session_id=sid,
        host_id="web-1",
        created_at=WHEN,
        host_key=keys.host,
    )
    out = w.start() + b"".join(w.write(f"frame {i}\n".encode()) for i in range(n_frames))
    return out + (w.close() if close else b"")


def test_directory_is_created_0700(tmp_path: Path) -> None:
    s = spool(tmp_path)
    st = s.directory.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701, 0o770])
def test_loose_modes_are_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(ConfigError, match="must be 0700"):
        prepare_spool_dir(d)


def test_another_owner_and_symlinks_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="owned by uid"):
        prepare_spool_dir(d, uid=os.geteuid() + 1)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(ConfigError, match="symlink"):
        prepare_spool_dir(link)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_spool_dir(f)


def test_recording_files_are_0600_exclusive_and_fsynced_appends(tmp_path: Path) -> None:
    s = spool(tmp_path)
    f = s.create_recording("abc")
    f.append(b"hello ")
    f.append(b"world")
    f.close()
    path = s.path("abc.sealed")
    assert path.read_bytes() == b"hello world"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        s.create_recording("abc")  # never reuse or follow an existing name
    (s.directory / "evil.sealed").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        s.create_recording("evil")
    assert not (tmp_path / "elsewhere").exists()


def test_records_round_trip_atomically_with_design_fields(tmp_path: Path) -> None:
    s = spool(tmp_path)
    record = SessionRecord(
        session_id="s1",
        user_email="jdoe@example.com",
        unix_user="jdoe",
        target_id="web-1",
        session_start="2026-11-22T10:00:00Z",
        client_port=5000,
        cert_serial=7,
        details={"uid": 1000},
    )
    s.write_record(record)
    path = s.path("s1.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    design = [
        "session_id",
        "user_email",
        "unix_user",
        "target_id",
        "hostname",
        "client_address",
        "client_port",
        "server_address",
        "server_port",
        "session_start",
        "session_finish",
        "program_type",
        "command",
        "exit_status",
        "error",
        "recording_status",
        "bytes_in",
        "bytes_out",
        "cert_serial",
        "cert_fingerprint",
        "principal",
    ]
    assert set(design) <= set(doc)
    assert doc["recording_status"] == "recording"
    assert doc["spool"]["state"] == "writing" and doc["spool"]["file"] == "s1.sealed"
    assert read_record(path) == record
    s.write_record(replace(record, recording_status=RecordingStatus.COMPLETE))
    assert s.read_record("s1").recording_status is RecordingStatus.COMPLETE
    assert [p.name for p in s.directory.iterdir()] == ["s1.json"]  # no temporary left


def test_bad_records_are_format_errors(tmp_path: Path) -> None:
    s = spool(tmp_path)
    for name, content in [("a.json", b"{"), ("b.json", b"[]"), ("c.json", b'{"session_id": "c"}')]:
        s.path(name).write_bytes(content)
        with pytest.raises(SealedFormatError):
            read_record(s.path(name))
    assert list(s.records()) == []  # skipped when listing


def test_scan_counts_frames_and_trailers(tmp_path: Path, keys: KeySet) -> None:
    s = spool(tmp_path)
    closed = sealed_bytes(keys, "a", 3, close=True)
    open_ = sealed_bytes(keys, "b", 3, close=False)
    s.path("a.sealed").write_bytes(closed)
    s.path("b.sealed").write_bytes(open_)
    s.path("c.sealed").write_bytes(open_[:-5])
    a = scan_sealed(s.path("a.sealed"))
    assert a.frames == 4  # three written, then the (empty) last frame
    assert a.trailer and not a.torn and a.size == len(closed)
    b = scan_sealed(s.path("b.sealed"))
    assert (b.frames, b.trailer, b.torn) == (3, False, False)
    c = scan_sealed(s.path("c.sealed"))
    assert (c.frames, c.torn) == (2, True)


def test_recover_closes_recordings_left_writing(tmp_path: Path, keys: KeySet) -> None:
    s = spool(tmp_path)
    s.path("s1.sealed").write_bytes(sealed_bytes(keys, "s1", 2, close=False))
    s.write_record(SessionRecord(session_id="s1", unix_user="jdoe", session_start="x"))
    s.write_record(
        SessionRecord(
            session_id="done",
            recording_status=RecordingStatus.COMPLETE,
            spool_state=SpoolState.CLOSED,
        )
    )
    s.path("orphan.sealed").write_bytes(sealed_bytes(keys, "orphan", 1, close=False))
    s.path(".x.json.tmp").write_text("half")
    s.prepare()
    assert not s.path(".x.json.tmp").exists()
    changed = {r.session_id: r for r in s.recover(WHEN)}
    assert set(changed) == {"s1", "orphan"}
    s1 = s.read_record("s1")
    assert s1.recording_status is RecordingStatus.TRUNCATED
    assert s1.spool_state is SpoolState.CLOSED and s1.frames == 2
    assert s1.session_finish and "daemon stopped" in (s1.error or "")
    orphan = s.read_record("orphan")
    assert orphan.recording_status is RecordingStatus.TRUNCATED
    assert orphan.session_start == "2026-11-22T10:00:00Z"
    assert s.read_record("done").recording_status is RecordingStatus.COMPLETE
    assert s.recover(WHEN) == []  # idempotent
    plain, result = decrypt(s.path("s1.sealed").read_bytes(), keys.auditor)
    assert result.completeness is Completeness.TRUNCATED and plain == b"frame 0\nframe 1\n"


def _finished(
    s: Spool, keys: KeySet, sid: str, start: str, size_frames: int, uid: int | None = None
) -> None:
    s.path(f"{sid}.sealed").write_bytes(sealed_bytes(keys, sid, size_frames, close=True))
    s.write_record(
        SessionRecord(
            session_id=sid,
            session_start=start,
            recording_status=RecordingStatus.COMPLETE,
            spool_state=SpoolState.CLOSED,
            details={} if uid is None else {"uid": uid},
        )
    )


def test_full_spool_refuses(tmp_path: Path, keys: KeySet) -> None:
    s = spool(tmp_path, max_bytes=2000)
    _finished(s, keys, "old", "2026-01-01T00:00:00Z", 40)
    assert s.usage() >= 2000
    assert s.make_room() == (False, [])
    assert s.path("old.sealed").exists()


def test_full_spool_drops_the_oldest_finished_of_the_same_user(
    tmp_path: Path, keys: KeySet
) -> None:
    s = spool(tmp_path, max_bytes=6000, on_full=OnSpoolFull.DROP_OLDEST)
    _finished(s, keys, "b-old", "2026-01-01T00:00:00Z", 40, uid=1001)
    _finished(s, keys, "a-new", "2026-06-01T00:00:00Z", 40, uid=1001)
    s.path("live.sealed").write_bytes(sealed_bytes(keys, "live", 40, close=False))
    s.write_record(SessionRecord(session_id="live", session_start="2025-01-01T00:00:00Z"))
    assert s.make_room() == (False, [])  # nobody named: no unshipped recording may go
    ok, dropped = s.make_room(1001)
    assert ok and dropped == ["b-old"]
    assert not s.path("b-old.sealed").exists() and s.path("a-new.sealed").exists()
    assert s.read_record("b-old").spool_state is SpoolState.DROPPED
    assert s.path("live.sealed").exists()  # a recording being written is never dropped


def test_drop_oldest_never_drops_another_users_unshipped_recording(
    tmp_path: Path, keys: KeySet
) -> None:
    s = spool(tmp_path, max_bytes=6000, on_full=OnSpoolFull.DROP_OLDEST)
    _finished(s, keys, "bob-old", "2026-01-01T00:00:00Z", 60, uid=1002)
    _finished(s, keys, "alice", "2026-06-01T00:00:00Z", 10, uid=1001)
    alice_size = s.path("alice.sealed").stat().st_size
    s.max_bytes = s.usage() - alice_size - 10  # full: only bob's recording would make room
    assert s.make_room(1001) == (False, ["alice"])  # her own went, bob's stays: still full
    assert s.path("bob-old.sealed").exists()
    assert s.read_record("bob-old").spool_state is SpoolState.CLOSED


def test_drop_oldest_drops_what_the_collector_holds_first(tmp_path: Path, keys: KeySet) -> None:
    s = spool(tmp_path, max_bytes=6000, on_full=OnSpoolFull.DROP_OLDEST)
    _finished(s, keys, "bob-shipped", "2026-03-01T00:00:00Z", 40, uid=1002)
    _finished(s, keys, "alice-old", "2026-01-01T00:00:00Z", 40, uid=1001)
    size = s.path("bob-shipped.sealed").stat().st_size
    partly = {"session_id": "bob-shipped", "acked": size - 1}
    s.max_bytes = s.usage() + 100  # full once the sidecar is there
    s.path("bob-shipped.ship").write_text(json.dumps(partly))
    assert s.make_room(1003, need=1000) == (False, [])  # not all of it: bob's still counts
    s.path("bob-shipped.ship").write_text(json.dumps({**partly, "acked": size}))
    ok, dropped = s.make_room(1001, need=1000)
    assert ok and dropped == ["bob-shipped"]  # whole at the collector: nothing is lost
    assert s.path("alice-old.sealed").exists()


def test_drop_oldest_cannot_drop_live_recordings(tmp_path: Path, keys: KeySet) -> None:
    s = spool(tmp_path, max_bytes=2000, on_full=OnSpoolFull.DROP_OLDEST)
    s.path("live.sealed").write_bytes(sealed_bytes(keys, "live", 80, close=False))
    s.write_record(SessionRecord(session_id="live"))
    assert s.make_room() == (False, [])


def test_pam_queue_is_taken_once(tmp_path: Path) -> None:
    s = spool(tmp_path)
    assert s.take_pam_queue() == []
    lines = [json.dumps({"phase": "open_session", "priv_pid": 5}), "garbage", "[1]", ""]
    s.path(PAM_QUEUE_NAME).write_text("\n".join(lines) + "\n")
    assert s.take_pam_queue() == [{"phase": "open_session", "priv_pid": 5}]
    assert s.take_pam_queue() == []
    assert not any(p.name.startswith("pam-queue") for p in s.directory.iterdir())


def test_list_spool(tmp_path: Path, keys: KeySet) -> None:
    s = spool(tmp_path)
    _finished(s, keys, "done", "2026-01-01T00:00:00Z", 2)
    s.path("live.sealed").write_bytes(sealed_bytes(keys, "live", 3, close=False))
    s.write_record(SessionRecord(session_id="live", unix_user="bob", session_start="2026-02-01"))
    s.write_record(
        SessionRecord(
            session_id="none",
            recording_status=RecordingStatus.UNRECORDED,
            spool_state=SpoolState.NONE,
            session_start="2026-03-01",
        )
    )
    entries = list_spool(s.directory)
    assert [e.session_id for e in entries] == ["done", "live", "none"]
    done, live, none = entries
    assert (done.frames, done.closed_file, done.recording_status) == (3, True, "complete")
    assert (live.frames, live.closed_file, live.unix_user) == (3, False, "bob")
    assert (none.frames, none.bytes, none.spool_state) == (0, 0, "none")
    assert live.to_json()["spool_state"] == "writing"
