"""The embedded backend: one SQLite database (WAL) for metadata, recording files beside it
(storage_files.py). ``DATA/collector.sqlite3`` and ``DATA/recordings/``.

Invariants (storage.py), and how this backend keeps them:
- a recording's committed length lives in the database; its bytes in the file. An append
  takes the file's flock, re-reads the committed length, writes and fsyncs at exactly that
  length, then commits the new length with a compare-and-set (``WHERE length = ?``): a
  crash between the two leaves a tail that is never served and is cut off by the next
  append; two writers (threads or processes) are serialised by the flock;
- an enrollment token is used once: marking it used, adding the host and adding its
  credential are one transaction, guarded by ``used_at IS NULL``;
- retention's delete checks holds and state, deletes the rows and logs the audit event in
  one ``BEGIN IMMEDIATE`` transaction (which also keeps a hold from being added halfway),
  then unlinks the file: a crash in between leaves a file no row names, never served.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sshaudit.collector.problems import ConflictError, StorageError
from sshaudit.collector.storage import (
    RETENTION_ACTION,
    RETENTION_ACTOR,
    AuditEvent,
    AuditorKey,
    CaKey,
    DeleteOutcome,
    Hold,
    HoldKind,
    Host,
    Policy,
    RecordingInfo,
    RecordingState,
    TokenKind,
    TokenRecord,
)
from sshaudit.collector.storage_files import FileBlobs
from sshaudit.collector.storage_sqlite_db import dt, dt_req, ts
from sshaudit.collector.storage_sqlite_records import RecordsDatabase, recording_from_row

DB_NAME = "collector.sqlite3"
RECORDINGS_DIR = "recordings"


log = logging.getLogger("sshaudit.collector")


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        token_id=row["token_id"],
        kind=TokenKind(row["kind"]),
        digest=bytes(row["digest"]),
        created_at=dt_req(row["created_at"]),
        expires_at=dt(row["expires_at"]),
        revoked_at=dt(row["revoked_at"]),
        used_at=dt(row["used_at"]),
        host_id=row["host_id"],
        comment=row["comment"],
        email=row["email"],
    )


def _host(row: sqlite3.Row) -> Host:
    return Host(
        host_id=row["host_id"],
        hostname=row["hostname"],
        public_key=bytes(row["public_key"]),
        enrolled_at=dt_req(row["enrolled_at"]),
        enrollment_token_id=row["enrollment_token_id"],
        backlog_sessions=row["backlog_sessions"],
        backlog_bytes=row["backlog_bytes"],
        backlog_at=dt(row["backlog_at"]),
        last_seen=dt(row["last_seen"]),
    )


_INSERT_TOKEN = (
    "INSERT INTO tokens (token_id, kind, digest, created_at, expires_at, revoked_at, "  # noqa: S105
    "used_at, host_id, comment, email) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _token_values(t: TokenRecord) -> tuple[object, ...]:
    return (
        t.token_id,
        t.kind.value,
        t.digest,
        ts(t.created_at),
        ts(t.expires_at),
        ts(t.revoked_at),
        ts(t.used_at),
        t.host_id,
        t.comment,
        t.email,
    )


class SqliteStorage(RecordsDatabase):
    """:class:`~sshaudit.collector.storage.Storage` on SQLite and files."""

    def __init__(self, data_dir: Path) -> None:
        self.blobs = FileBlobs(data_dir / RECORDINGS_DIR)
        super().__init__(data_dir / DB_NAME)

    # --- tokens and hosts

    def add_token(self, token: TokenRecord) -> None:
        with self._write() as con:
            con.execute(_INSERT_TOKEN, _token_values(token))

    def token_by_digest(self, digest: bytes) -> TokenRecord | None:
        with self._read() as con:
            row = con.execute("SELECT * FROM tokens WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else _token(row)

    def list_tokens(self) -> list[TokenRecord]:
        with self._read() as con:
            rows = con.execute("SELECT * FROM tokens ORDER BY created_at, token_id").fetchall()
        return [_token(r) for r in rows]

    def revoke_token(self, token_id: str, at: datetime) -> TokenRecord | None:
        with self._write() as con:
            con.execute(
                "UPDATE tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                (ts(at), token_id),
            )
            row = con.execute("SELECT * FROM tokens WHERE token_id = ?", (token_id,)).fetchone()
        return None if row is None else _token(row)

    def enroll_host(self, enrollment: TokenRecord, host: Host, credential: TokenRecord) -> None:
        with self._write() as con:
            cur = con.execute(
                "UPDATE tokens SET used_at = ?, host_id = ? WHERE token_id = ? AND kind = ? "
                "AND used_at IS NULL AND revoked_at IS NULL",
                (ts(host.enrolled_at), host.host_id, enrollment.token_id, TokenKind.AGENT.value),
            )
            if cur.rowcount != 1:
                raise ConflictError("this enrollment token was already used", code="token_used")
            con.execute(
                "INSERT INTO hosts (host_id, hostname, public_key, enrolled_at, "
                "enrollment_token_id) VALUES (?, ?, ?, ?, ?)",
                (
                    host.host_id,
                    host.hostname,
                    host.public_key,
                    ts(host.enrolled_at),
                    host.enrollment_token_id,
                ),
            )
            con.execute(_INSERT_TOKEN, _token_values(credential))

    def get_host(self, host_id: str) -> Host | None:
        with self._read() as con:
            row = con.execute("SELECT * FROM hosts WHERE host_id = ?", (host_id,)).fetchone()
        return None if row is None else _host(row)

    def list_hosts(self) -> list[Host]:
        with self._read() as con:
            rows = con.execute("SELECT * FROM hosts ORDER BY enrolled_at, host_id").fetchall()
        return [_host(r) for r in rows]

    def report_backlog(self, host_id: str, sessions: int, nbytes: int, at: datetime) -> None:
        with self._write() as con:
            con.execute(
                "UPDATE hosts SET backlog_sessions = ?, backlog_bytes = ?, backlog_at = ?, "
                "last_seen = ? WHERE host_id = ?",
                (sessions, nbytes, ts(at), ts(at), host_id),
            )

    # --- auditor keys, CA keys, policy

    def add_auditor_key(self, key: AuditorKey) -> bool:
        with self._write() as con:
            cur = con.execute(
                "INSERT OR IGNORE INTO auditor_keys (kid, public_key, comment, added_at) "
                "VALUES (?, ?, ?, ?)",
                (key.kid, key.public_key, key.comment, ts(key.added_at)),
            )
            return cur.rowcount == 1

    def list_auditor_keys(self) -> list[AuditorKey]:
        with self._read() as con:
            rows = con.execute("SELECT * FROM auditor_keys ORDER BY added_at, kid").fetchall()
        return [
            AuditorKey(r["kid"], bytes(r["public_key"]), r["comment"], dt_req(r["added_at"]))
            for r in rows
        ]

    def remove_auditor_key(self, kid: str) -> bool:
        with self._write() as con:
            return con.execute("DELETE FROM auditor_keys WHERE kid = ?", (kid,)).rowcount == 1

    def add_ca_key(self, key: CaKey) -> bool:
        with self._write() as con:
            cur = con.execute(
                "INSERT OR IGNORE INTO ca_keys (key_id, line, fingerprint, added_at) "
                "VALUES (?, ?, ?, ?)",
                (key.key_id, key.line, key.fingerprint, ts(key.added_at)),
            )
            return cur.rowcount == 1

    def list_ca_keys(self) -> list[CaKey]:
        with self._read() as con:
            rows = con.execute("SELECT * FROM ca_keys ORDER BY added_at, key_id").fetchall()
        return [
            CaKey(r["key_id"], r["line"], r["fingerprint"], dt_req(r["added_at"])) for r in rows
        ]

    def remove_ca_key(self, key_id: str) -> bool:
        with self._write() as con:
            return con.execute("DELETE FROM ca_keys WHERE key_id = ?", (key_id,)).rowcount == 1

    def get_policy(self) -> Policy:
        with self._read() as con:
            row = con.execute("SELECT * FROM policy WHERE id = 1").fetchone()
        return Policy(json.loads(row["document"]), row["version"], dt(row["updated_at"]))

    def set_policy(self, document: Mapping[str, Any], at: datetime) -> Policy:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"))
        with self._write() as con:
            row = con.execute(
                "UPDATE policy SET document = ?, version = version + 1, updated_at = ? "
                "WHERE id = 1 RETURNING version",
                (text, ts(at)),
            ).fetchone()
        return Policy(json.loads(text), row["version"], at)

    # --- recordings

    def get_recording(self, session_id: str) -> RecordingInfo | None:
        with self._read() as con:
            row = con.execute(
                "SELECT * FROM recordings WHERE session_id = ?", (session_id,)
            ).fetchone()
        return None if row is None else recording_from_row(row)

    def start_recording(self, info: RecordingInfo, prefix: bytes) -> bool:
        with self.blobs.writer(info.host_id, info.session_id, create=True) as blob:
            if self.get_recording(info.session_id) is not None:
                return False
            blob.write_at(0, prefix)  # cuts whatever an uncommitted earlier attempt left
            blob.sync_dir()
            try:
                with self._write() as con:
                    con.execute(
                        "INSERT INTO recordings (session_id, host_id, header_length, length, "
                        "frames, state, created_at, updated_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
                        (
                            info.session_id,
                            info.host_id,
                            len(prefix),
                            len(prefix),
                            RecordingState.OPEN.value,
                            ts(info.created_at),
                            ts(info.updated_at),
                        ),
                    )
            except sqlite3.IntegrityError:
                return False  # another host's file of the same id won (another directory)
        return True

    def append_recording(
        self,
        session_id: str,
        offset: int,
        data: bytes,
        frames: int,
        at: datetime,
        *,
        seal: bool,
    ) -> RecordingInfo:
        first = self.get_recording(session_id)
        if first is None:
            raise ConflictError("no recording started for this session", code="not_started")
        with self.blobs.writer(first.host_id, session_id, create=False) as blob:
            rec = self.get_recording(session_id)
            assert rec is not None  # recordings rows are never deleted through this class
            if rec.state is RecordingState.SEALED_VERIFIED:
                raise ConflictError(
                    "the recording is sealed", code="recording_sealed", extra={"length": rec.length}
                )
            if rec.length != offset:
                raise ConflictError(
                    f"offset {offset} is not the recording's length {rec.length}",
                    code="offset_mismatch",
                    extra={"length": rec.length},
                )
            blob.write_at(offset, data)
            state = RecordingState.SEALED_VERIFIED if seal else RecordingState.OPEN
            with self._write() as con:
                row = con.execute(
                    "UPDATE recordings SET length = ?, frames = frames + ?, state = ?, "
                    "updated_at = ?, verified_at = ? WHERE session_id = ? AND length = ? "
                    "RETURNING *",
                    (
                        offset + len(data),
                        frames,
                        state.value,
                        ts(at),
                        ts(at) if seal else None,
                        session_id,
                        offset,
                    ),
                ).fetchone()
            if row is None:
                raise StorageError("the recording changed during an append under its lock")
        return recording_from_row(row)

    def read_recording(self, session_id: str, start: int, end: int) -> Iterator[bytes]:
        rec = self.get_recording(session_id)
        if rec is None or not 0 <= start <= end <= rec.length:
            raise StorageError("read outside the committed recording")
        return self.blobs.read(rec.host_id, session_id, start, end)

    # --- holds and audit

    def add_hold(self, hold: Hold) -> None:
        with self._write() as con:
            con.execute(
                "INSERT INTO holds (hold_id, kind, value, reason, created_at, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    hold.hold_id,
                    hold.kind.value,
                    hold.value,
                    hold.reason,
                    ts(hold.created_at),
                    hold.created_by,
                ),
            )

    def list_holds(self) -> list[Hold]:
        with self._read() as con:
            rows = con.execute("SELECT * FROM holds ORDER BY created_at, hold_id").fetchall()
        return [
            Hold(
                r["hold_id"],
                HoldKind(r["kind"]),
                r["value"],
                r["reason"],
                dt_req(r["created_at"]),
                r["created_by"],
            )
            for r in rows
        ]

    def remove_hold(self, hold_id: str) -> bool:
        with self._write() as con:
            return con.execute("DELETE FROM holds WHERE hold_id = ?", (hold_id,)).rowcount == 1

    def audit(self, event: AuditEvent) -> None:
        with self._write() as con:
            con.execute(
                "INSERT INTO audit_events (at, actor, action, subject, detail) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    ts(event.at),
                    event.actor,
                    event.action,
                    event.subject,
                    json.dumps(dict(event.detail), sort_keys=True),
                ),
            )

    def list_audit(self, after_id: int, limit: int) -> list[AuditEvent]:
        with self._read() as con:
            rows = con.execute(
                "SELECT * FROM audit_events WHERE event_id > ? ORDER BY event_id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [
            AuditEvent(
                at=dt_req(r["at"]),
                actor=r["actor"],
                action=r["action"],
                subject=r["subject"],
                detail=json.loads(r["detail"]),
                event_id=r["event_id"],
            )
            for r in rows
        ]

    # --- retention

    def delete_expired(self, session_id: str, reason: str, at: datetime) -> DeleteOutcome:
        with self._write() as con:
            row = con.execute(
                "SELECT s.target_id, s.user_email, s.recording_status, r.host_id, r.state "
                "FROM sessions s LEFT JOIN recordings r ON r.session_id = s.session_id "
                "WHERE s.session_id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                return DeleteOutcome.MISSING
            if row["recording_status"] == "recording" or row["state"] == RecordingState.OPEN.value:
                return DeleteOutcome.OPEN
            held = con.execute(
                "SELECT 1 FROM holds WHERE (kind = ? AND value = ?) OR (kind = ? AND value = ?) "
                "OR (kind = ? AND value = ?) LIMIT 1",
                _hold_params(session_id, row["user_email"], row["target_id"]),
            ).fetchone()
            if held is not None:
                return DeleteOutcome.HELD
            con.execute("DELETE FROM recordings WHERE session_id = ?", (session_id,))
            con.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            detail = {
                "session_id": session_id,
                "target_id": row["target_id"],
                "user_email": row["user_email"],
                "reason": reason,
            }
            con.execute(
                "INSERT INTO audit_events (at, actor, action, subject, detail) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    ts(at),
                    RETENTION_ACTOR,
                    RETENTION_ACTION,
                    session_id,
                    json.dumps(detail, sort_keys=True),
                ),
            )
        if row["host_id"] is not None:
            try:
                self.blobs.delete(row["host_id"], session_id)
            except StorageError as exc:  # committed already: the file is unreferenced now
                log.error("retention: file of %s left behind: %s", session_id, exc.message)
        return DeleteOutcome.DELETED


def _hold_params(session_id: str, user_email: str, target_id: str) -> tuple[str, ...]:
    return (
        HoldKind.SESSION.value,
        session_id,
        HoldKind.USER.value,
        user_email,
        HoldKind.TARGET.value,
        target_id,
    )
