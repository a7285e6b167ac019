"""The embedded storage (SQLite + files) against the invariants of collector/storage.py."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from collector_helpers import (
    T0,
    Host,
    Sealed,
    auth_event,
    cast_pieces,
    enroll_direct,
    local_collector,
    make_sealed,
    new_session_id,
    record,
)

from sshaudit.collector import admin, ingest, tokens
from sshaudit.collector.models import AuthEvent, SessionRecord, parse_time, to_us
from sshaudit.collector.problems import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    StorageError,
    UnauthorizedError,
)
from sshaudit.collector.storage import (
    AuthEventQuery,
    PutOutcome,
    RecordingState,
    SessionQuery,
    Storage,
    TokenKind,
)
from sshaudit.collector.storage import Host as StoredHost
from sshaudit.collector.storage_files import FileBlobs
from sshaudit.collector.storage_sqlite import SqliteStorage
from sshaudit.collector.storage_sqlite_schema import MIGRATIONS


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStorage]:
    s = SqliteStorage(tmp_path)
    yield s
    s.close()


def stored_host(storage: Storage, host: Host) -> StoredHost:
    found = storage.get_host(host.host_id)
    assert found is not None
    return found


def test_schema_is_migrated_once_and_versioned(tmp_path: Path) -> None:
    SqliteStorage(tmp_path).close()
    again = SqliteStorage(tmp_path)  # reopening applies nothing twice
    assert again.schema_version() == max(v for v, _ in MIGRATIONS)
    again.close()
    con = sqlite3.connect(tmp_path / "collector.sqlite3")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = con.execute("SELECT version FROM schema_migrations").fetchall()
    assert rows == [(v,) for v, _ in MIGRATIONS]
    con.execute("INSERT INTO schema_migrations VALUES (999, 'x')")
    con.commit()
    con.close()
    with pytest.raises(StorageError, match="newer than this collector"):
        SqliteStorage(tmp_path)


def test_files_are_private(store: SqliteStorage, tmp_path: Path) -> None:
    host = enroll_direct(store, T0)
    sid = new_session_id()
    sealed = make_sealed(host, sid, cast_pieces())
    ingest.put_prefix(store, stored_host(store, host), sid, sealed.prefix, T0)
    assert stat.S_IMODE((tmp_path / "collector.sqlite3").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "recordings").stat().st_mode) == 0o700
    host_dir = tmp_path / "recordings" / host.host_id
    assert stat.S_IMODE(host_dir.stat().st_mode) == 0o700
    (file,) = host_dir.iterdir()
    assert stat.S_IMODE(file.stat().st_mode) == 0o600


def test_tokens_hash_only_and_states(store: SqliteStorage) -> None:
    token, rec = admin.create_token(store, TokenKind.AUDITOR, T0, actor="t", ttl=timedelta(hours=1))
    raw = (store.path).read_bytes()
    assert token.encode() not in raw  # only the hash is stored
    assert tokens.authenticate(store, token, T0).token_id == rec.token_id
    with pytest.raises(UnauthorizedError) as exc:
        tokens.authenticate(store, token, T0 + timedelta(hours=1))
    assert exc.value.code == "token_expired"
    admin.revoke_token(store, rec.token_id, T0, actor="t")
    with pytest.raises(UnauthorizedError) as exc:
        tokens.authenticate(store, token, T0)
    assert exc.value.code == "token_revoked"
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(UnauthorizedError) as exc:
        tokens.authenticate(store, forged, T0)
    assert exc.value.code == "invalid_token"
    # the kind in the prefix is covered by the hash: an auditor token relabelled admin fails
    with pytest.raises(UnauthorizedError):
        tokens.authenticate(store, token.replace("sa_auditor_", "sa_admin_"), T0)


def test_enrollment_token_is_used_once(store: SqliteStorage) -> None:
    host = enroll_direct(store, T0)
    (enrollment,) = [t for t in store.list_tokens() if t.kind is TokenKind.AGENT]
    assert enrollment.used_at is not None and enrollment.host_id == host.host_id
    h = stored_host(store, host)
    with pytest.raises(ConflictError):
        store.enroll_host(enrollment, h, enrollment)
    credential = tokens.authenticate(store, host.credential, T0)
    assert credential.kind is TokenKind.HOST and credential.host_id == host.host_id


def test_session_record_rules(store: SqliteStorage) -> None:
    a = stored_host(store, enroll_direct(store, T0, "a"))
    b = stored_host(store, enroll_direct(store, T0, "b"))
    sid = new_session_id()
    first = SessionRecord.model_validate(record(sid))
    assert ingest.put_session(store, a, sid, first, T0) is PutOutcome.CREATED
    assert ingest.put_session(store, a, sid, first, T0) is PutOutcome.UNCHANGED
    more = SessionRecord.model_validate(record(sid, bytes_out=10))
    assert ingest.put_session(store, a, sid, more, T0) is PutOutcome.UPDATED
    with pytest.raises(ForbiddenError):
        ingest.put_session(store, b, sid, more, T0)
    final = SessionRecord.model_validate(
        record(
            sid, bytes_out=20, recording_status="complete", session_finish="2026-11-22T10:00:00Z"
        )
    )
    assert ingest.put_session(store, a, sid, final, T0) is PutOutcome.UPDATED
    assert ingest.put_session(store, a, sid, final, T0) is PutOutcome.UNCHANGED
    changed = SessionRecord.model_validate(record(sid, bytes_out=99, recording_status="complete"))
    with pytest.raises(ConflictError) as exc:
        ingest.put_session(store, a, sid, changed, T0)
    assert exc.value.code == "record_immutable"
    stored = store.get_session(sid)
    assert stored is not None and stored.record.bytes_out == 20
    assert stored.record.target_id == a.host_id and stored.record.hostname == "a"


def test_auth_events_idempotent_and_all_or_none(store: SqliteStorage) -> None:
    a = stored_host(store, enroll_direct(store, T0))
    events = [AuthEvent.model_validate(auth_event(f"e{i}")) for i in range(3)]
    assert ingest.add_auth_events(store, a, events, T0) == (3, 0)
    assert ingest.add_auth_events(store, a, events, T0) == (0, 3)
    clash = [
        AuthEvent.model_validate(auth_event("e9")),
        AuthEvent.model_validate(auth_event("e1", allowed=False)),
    ]
    with pytest.raises(ConflictError):
        ingest.add_auth_events(store, a, clash, T0)
    got = store.query_auth_events(AuthEventQuery())
    assert sorted(e.event.event_id for e in got) == ["e0", "e1", "e2"]  # e9 not stored


def _upload(store: Storage, host: StoredHost, sealed: Sealed, sid: str) -> None:
    out = ingest.put_prefix(store, host, sid, sealed.prefix, T0)
    ingest.append_chunk(store, host, sid, out.recording.length, sealed.body, T0)


def test_append_is_compare_and_set(store: SqliteStorage) -> None:
    h = enroll_direct(store, T0)
    host = stored_host(store, h)
    sid = new_session_id()
    sealed = make_sealed(h, sid, cast_pieces())
    ingest.put_prefix(store, host, sid, sealed.prefix, T0)
    n = len(sealed.prefix)
    rec = store.append_recording(sid, n, sealed.frames[0], 1, T0, seal=False)
    assert (rec.length, rec.frames) == (n + len(sealed.frames[0]), 1)
    with pytest.raises(ConflictError) as exc:  # a second writer with the old length loses
        store.append_recording(sid, n, sealed.frames[1], 1, T0, seal=False)
    assert exc.value.extra == {"length": rec.length}
    data = b"".join(store.read_recording(sid, 0, rec.length))
    assert data == sealed.prefix + sealed.frames[0]


def test_a_crash_tail_is_cut_and_never_served(store: SqliteStorage, tmp_path: Path) -> None:
    h = enroll_direct(store, T0)
    host = stored_host(store, h)
    sid = new_session_id()
    sealed = make_sealed(h, sid, cast_pieces())
    ingest.put_prefix(store, host, sid, sealed.prefix, T0)
    path = tmp_path / "recordings" / h.host_id / f"{sid}.sealed"
    with path.open("ab") as f:  # written, then the collector died before the commit
        f.write(b"garbage never acknowledged" * (len(sealed.body) // 10))
    rec = store.get_recording(sid)
    assert rec is not None and rec.length == len(sealed.prefix)
    assert b"".join(store.read_recording(sid, 0, rec.length)) == sealed.prefix
    ingest.append_chunk(store, host, sid, rec.length, sealed.body, T0)
    assert path.read_bytes() == sealed.data


def test_complete_upload_is_sealed_for_good(store: SqliteStorage) -> None:
    h = enroll_direct(store, T0)
    host = stored_host(store, h)
    sid = new_session_id()
    sealed = make_sealed(h, sid, cast_pieces())
    _upload(store, host, sealed, sid)
    rec = store.get_recording(sid)
    assert rec is not None and rec.state is RecordingState.SEALED_VERIFIED
    assert rec.frames == len(sealed.frames) and rec.verified_at == T0
    assert b"".join(store.read_recording(sid, 0, rec.length)) == sealed.data
    actions = [e.action for e in store.list_audit(0, 100)]
    assert "recording_verified" in actions


def test_file_blobs_refuse_bad_ids_and_symlinks(tmp_path: Path) -> None:
    blobs = FileBlobs(tmp_path / "rec")
    sid = new_session_id()
    for host_id, session_id in [
        ("..", sid),
        ("a/b", sid),
        ("web", "../../etc/passwd"),
        (".hidden", sid),
        ("web", sid.upper()),
    ]:
        with pytest.raises(BadRequestError), blobs.writer(host_id, session_id, create=True):
            pass
        with pytest.raises(BadRequestError):
            blobs.read(host_id, session_id, 0, 1)
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.symlink(target, tmp_path / "rec" / "web")  # a planted directory link
    with pytest.raises(StorageError), blobs.writer("web", sid, create=True):
        pass
    assert list(target.iterdir()) == []
    (tmp_path / "rec" / "web2").mkdir(mode=0o700)
    os.symlink(tmp_path / "victim", tmp_path / "rec" / "web2" / f"{sid}.sealed")
    with pytest.raises(StorageError), blobs.writer("web2", sid, create=True):
        pass
    assert not (tmp_path / "victim").exists()


def test_recordings_dir_must_be_private(tmp_path: Path) -> None:
    (tmp_path / "rec").mkdir(mode=0o755)
    (tmp_path / "rec").chmod(0o755)
    with pytest.raises(StorageError):
        FileBlobs(tmp_path / "rec")


def _put(store: Storage, host: StoredHost, n: int, **fields: object) -> str:
    sid = new_session_id()
    start = f"2026-11-{10 + n:02d}T09:00:00Z"
    doc = record(sid, session_start=start, **fields)
    ingest.put_session(store, host, sid, SessionRecord.model_validate(doc), T0)
    return sid


def test_queries_filter_and_page_newest_first(store: SqliteStorage) -> None:
    a = stored_host(store, enroll_direct(store, T0, "a"))
    b = stored_host(store, enroll_direct(store, T0, "b"))
    ids = [_put(store, a if i % 2 else b, i, unix_user=f"u{i % 3}") for i in range(12)]
    everything = store.query_sessions(SessionQuery(limit=100))
    assert [s.record.session_id for s in everything] == ids[::-1]
    pages, after = [], None
    while True:
        page = store.query_sessions(SessionQuery(after=after, limit=5))
        if not page:
            break
        pages.append([s.record.session_id for s in page])
        last = page[-1]
        after = (to_us(parse_time(last.record.session_start)), last.record.session_id)
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [sid for p in pages for sid in p] == ids[::-1]
    only = store.query_sessions(SessionQuery(filters={"target_id": a.host_id, "unix_user": "u1"}))
    want = [sid for i, sid in enumerate(ids) if i % 2 and i % 3 == 1]
    assert [s.record.session_id for s in only] == want[::-1]
    since = to_us(parse_time("2026-11-15T09:00:00Z"))
    until = to_us(parse_time("2026-11-18T09:00:00Z"))
    window = store.query_sessions(SessionQuery(since_us=since, until_us=until))
    assert [s.record.session_id for s in window] == ids[5:8][::-1]
    with pytest.raises(ValueError):
        store.query_sessions(SessionQuery(filters={"session_id; DROP TABLE sessions": "x"}))


def test_changes_feed_in_store_order(store: SqliteStorage) -> None:
    a = stored_host(store, enroll_direct(store, T0))
    s1 = _put(store, a, 1)
    ingest.add_auth_events(store, a, [AuthEvent.model_validate(auth_event("x1"))], T0)
    s2 = _put(store, a, 2)
    doc = record(s1, recording_status="complete")
    ingest.put_session(store, a, s1, SessionRecord.model_validate(doc), T0)
    feed = store.changes(0, 100)
    kinds = [
        c.session.record.session_id if c.session else c.auth_event.event.event_id  # type: ignore[union-attr]
        for c in feed
    ]
    assert kinds == ["x1", s2, s1]  # s1 moved to the end when it changed
    assert [c.seq for c in feed] == sorted(c.seq for c in feed)
    assert store.changes(feed[1].seq, 100)[0].seq == feed[2].seq


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: the collector's disk, made to fill up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"DISK-FULL TEST NOT RUN: cannot mount a tmpfs: {proc.stderr.decode()!r}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_507_and_loses_nothing(small_disk: Path) -> None:
    (small_disk / "data").mkdir(mode=0o700)
    loc = local_collector(small_disk / "data", embedded=True)
    host = loc.enroll()
    sid = new_session_id()
    f = make_sealed(host, sid, [os.urandom(400_000) for _ in range(4)])
    h = {**loc.auth(host.credential), "Content-Type": "application/octet-stream"}
    url = f"/v1/sessions/{sid}/recording"
    assert loc.client.put(url, content=f.prefix, headers=h).status_code == 200
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - 300_000))  # room for less than the chunk
    resp = loc.client.post(url, params={"offset": len(f.prefix)}, content=f.body, headers=h)
    assert resp.status_code == 507, resp.text
    assert resp.json()["error"] == "storage_full"
    path = small_disk / "data" / "recordings" / host.host_id / f"{sid}.sealed"
    assert path.read_bytes() == f.prefix  # cut back: nothing half-written stays
    status = loc.client.get(url + "/status", headers=h).json()
    assert (status["length"], status["frames"]) == (len(f.prefix), 0)
    filler.unlink()  # space returns: the same upload goes through
    resp = loc.client.post(url, params={"offset": len(f.prefix)}, content=f.body, headers=h)
    assert resp.json()["state"] == "sealed_verified"
    assert path.read_bytes() == f.data
    loc.client.close()
    loc.storage.close()
