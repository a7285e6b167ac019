"""The fleet backend: PostgreSQL for metadata, an S3-compatible object store for recording
bytes (storage_s3.py). Several collector processes may share one database and bucket: an
agent can switch collectors mid-recording and nothing is lost or doubled.

Invariants (storage.py), and how this backend keeps them with several writers:
- a recording's committed length and its list of parts live in the database; its bytes in
  objects. An append locks the recording's row (``SELECT ... FOR UPDATE``: a second
  collector appending to the same recording waits), checks the offset against the
  committed length, writes the bytes as a new object, then records the part and the new
  length and commits. The object is acknowledged before the commit, the commit before
  the answer: a 200 means both are durable. A crash or a lost row lock between the two
  leaves an object no part names, which is never served;
- two appends at one offset: the second waits for the first's commit, then finds the length
  moved and gets ``ConflictError`` with the new length: exactly one wins;
- an enrollment token is used once: marking it used, adding the host and adding its
  credential are one transaction, guarded by ``used_at IS NULL`` on the locked row;
- retention deletes rows and logs its audit event in one transaction that first takes
  ``LOCK TABLE holds IN SHARE MODE`` (a hold added concurrently waits, or is seen), then
  deletes the objects after the commit: a crash in between leaves objects no part names;
- audit ids come from the ``audit`` counter (storage_pg_schema.py), so "after N" paging
  never skips an entry another collector commits later.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import datetime
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
from sshaudit.collector.storage_pg_config import PgConfig, S3Config
from sshaudit.collector.storage_pg_db import Cursor, utc, utc_req
from sshaudit.collector.storage_pg_records import PgRecords, recording_from_row
from sshaudit.collector.storage_s3 import Part, S3Blobs

log = logging.getLogger("sshaudit.collector")


def _token(row: Mapping[str, Any]) -> TokenRecord:
    return TokenRecord(
        token_id=row["token_id"],
        kind=TokenKind(row["kind"]),
        digest=bytes(row["digest"]),
        created_at=utc_req(row["created_at"]),
        expires_at=utc(row["expires_at"]),
        revoked_at=utc(row["revoked_at"]),
        used_at=utc(row["used_at"]),
        host_id=row["host_id"],
        comment=row["comment"],
        email=row["email"],
    )


def _host(row: Mapping[str, Any]) -> Host:
    return Host(
        host_id=row["host_id"],
        hostname=row["hostname"],
        public_key=bytes(row["public_key"]),
        enrolled_at=utc_req(row["enrolled_at"]),
        enrollment_token_id=row["enrollment_token_id"],
        backlog_sessions=row["backlog_sessions"],
        backlog_bytes=row["backlog_bytes"],
        backlog_at=utc(row["backlog_at"]),
        last_seen=utc(row["last_seen"]),
    )


_INSERT_TOKEN = (
    "INSERT INTO tokens (token_id, kind, digest, created_at, expires_at, revoked_at, "  # noqa: S105
    "used_at, host_id, comment, email) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def _token_values(t: TokenRecord) -> tuple[object, ...]:
    return (
        t.token_id,
        t.kind.value,
        t.digest,
        t.created_at,
        t.expires_at,
        t.revoked_at,
        t.used_at,
        t.host_id,
        t.comment,
        t.email,
    )


def _conflict(rec: RecordingInfo, offset: int) -> ConflictError | None:
    if rec.state is RecordingState.SEALED_VERIFIED:
        return ConflictError(
            "the recording is sealed", code="recording_sealed", extra={"length": rec.length}
        )
    if rec.length != offset:
        return ConflictError(
            f"offset {offset} is not the recording's length {rec.length}",
            code="offset_mismatch",
            extra={"length": rec.length},
        )
    return None


class PgS3Storage(PgRecords):
    """:class:`~sshaudit.collector.storage.Storage` on PostgreSQL and an S3 bucket."""

    def __init__(self, pg: PgConfig, s3: S3Config) -> None:
        self.blobs = S3Blobs(s3)
        super().__init__(pg)

    def ping(self) -> None:
        super().ping()
        self.blobs.ping()

    # --- tokens and hosts

    def add_token(self, token: TokenRecord) -> None:
        with self._write() as cur:
            cur.execute(_INSERT_TOKEN, _token_values(token))

    def token_by_digest(self, digest: bytes) -> TokenRecord | None:
        with self._read() as cur:
            row = cur.execute("SELECT * FROM tokens WHERE digest = %s", (digest,)).fetchone()
        return None if row is None else _token(row)

    def list_tokens(self) -> list[TokenRecord]:
        with self._read() as cur:
            rows = cur.execute("SELECT * FROM tokens ORDER BY created_at, token_id").fetchall()
        return [_token(r) for r in rows]

    def revoke_token(self, token_id: str, at: datetime) -> TokenRecord | None:
        with self._write() as cur:
            cur.execute(
                "UPDATE tokens SET revoked_at = %s WHERE token_id = %s AND revoked_at IS NULL",
                (at, token_id),
            )
            row = cur.execute("SELECT * FROM tokens WHERE token_id = %s", (token_id,)).fetchone()
        return None if row is None else _token(row)

    def enroll_host(self, enrollment: TokenRecord, host: Host, credential: TokenRecord) -> None:
        with self._write() as cur:
            cur.execute(
                "UPDATE tokens SET used_at = %s, host_id = %s WHERE token_id = %s AND kind = %s "
                "AND used_at IS NULL AND revoked_at IS NULL",
                (host.enrolled_at, host.host_id, enrollment.token_id, TokenKind.AGENT.value),
            )
            if cur.rowcount != 1:
                raise ConflictError("this enrollment token was already used", code="token_used")
            cur.execute(
                "INSERT INTO hosts (host_id, hostname, public_key, enrolled_at, "
                "enrollment_token_id) VALUES (%s, %s, %s, %s, %s)",
                (
                    host.host_id,
                    host.hostname,
                    host.public_key,
                    host.enrolled_at,
                    host.enrollment_token_id,
                ),
            )
            cur.execute(_INSERT_TOKEN, _token_values(credential))

    def get_host(self, host_id: str) -> Host | None:
        with self._read() as cur:
            row = cur.execute("SELECT * FROM hosts WHERE host_id = %s", (host_id,)).fetchone()
        return None if row is None else _host(row)

    def list_hosts(self) -> list[Host]:
        with self._read() as cur:
            rows = cur.execute("SELECT * FROM hosts ORDER BY enrolled_at, host_id").fetchall()
        return [_host(r) for r in rows]

    def report_backlog(self, host_id: str, sessions: int, nbytes: int, at: datetime) -> None:
        with self._write() as cur:
            cur.execute(
                "UPDATE hosts SET backlog_sessions = %s, backlog_bytes = %s, backlog_at = %s, "
                "last_seen = %s WHERE host_id = %s",
                (sessions, nbytes, at, at, host_id),
            )

    # --- auditor keys, CA keys, policy

    def add_auditor_key(self, key: AuditorKey) -> bool:
        with self._write() as cur:
            cur.execute(
                "INSERT INTO auditor_keys (kid, public_key, comment, added_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (kid) DO NOTHING",
                (key.kid, key.public_key, key.comment, key.added_at),
            )
            return cur.rowcount == 1

    def list_auditor_keys(self) -> list[AuditorKey]:
        with self._read() as cur:
            rows = cur.execute("SELECT * FROM auditor_keys ORDER BY added_at, kid").fetchall()
        return [
            AuditorKey(r["kid"], bytes(r["public_key"]), r["comment"], utc_req(r["added_at"]))
            for r in rows
        ]

    def remove_auditor_key(self, kid: str) -> bool:
        with self._write() as cur:
            cur.execute("DELETE FROM auditor_keys WHERE kid = %s", (kid,))
            return cur.rowcount == 1

    def add_ca_key(self, key: CaKey) -> bool:
        with self._write() as cur:
            cur.execute(
                "INSERT INTO ca_keys (key_id, line, fingerprint, added_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (key_id) DO NOTHING",
                (key.key_id, key.line, key.fingerprint, key.added_at),
            )
            return cur.rowcount == 1

    def list_ca_keys(self) -> list[CaKey]:
        with self._read() as cur:
            rows = cur.execute("SELECT * FROM ca_keys ORDER BY added_at, key_id").fetchall()
        return [
            CaKey(r["key_id"], r["line"], r["fingerprint"], utc_req(r["added_at"])) for r in rows
        ]

    def remove_ca_key(self, key_id: str) -> bool:
        with self._write() as cur:
            cur.execute("DELETE FROM ca_keys WHERE key_id = %s", (key_id,))
            return cur.rowcount == 1

    def get_policy(self) -> Policy:
        with self._read() as cur:
            row = cur.execute("SELECT * FROM policy WHERE id = 1").fetchone()
        if row is None:
            raise StorageError("the policy row is missing: the database was changed by hand")
        return Policy(json.loads(row["document"]), row["version"], utc(row["updated_at"]))

    def set_policy(self, document: Mapping[str, Any], at: datetime) -> Policy:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"))
        with self._write() as cur:
            row = cur.execute(
                "UPDATE policy SET document = %s, version = version + 1, updated_at = %s "
                "WHERE id = 1 RETURNING version",
                (text, at),
            ).fetchone()
        if row is None:
            raise StorageError("the policy row is missing: the database was changed by hand")
        return Policy(json.loads(text), row["version"], at)

    # --- recordings

    def get_recording(self, session_id: str) -> RecordingInfo | None:
        with self._read() as cur:
            cur.execute("SELECT * FROM recordings WHERE session_id = %s", (session_id,))
            row = cur.fetchone()
        return None if row is None else recording_from_row(row)

    def _add_part(self, cur: Cursor, session_id: str, offset: int, key: str, data: bytes) -> None:
        cur.execute(
            "INSERT INTO recording_parts (session_id, part_offset, length, object_key, sha256) "
            "VALUES (%s, %s, %s, %s, %s)",
            (session_id, offset, len(data), key, hashlib.sha256(data).digest()),
        )

    def start_recording(self, info: RecordingInfo, prefix: bytes) -> bool:
        if self.get_recording(info.session_id) is not None:
            return False
        key = self.blobs.new_key(info.host_id, info.session_id, 0)
        self.blobs.put(key, prefix)  # before the row: a row always names stored bytes
        with self._write() as cur:
            cur.execute(
                "INSERT INTO recordings (session_id, host_id, header_length, length, frames, "
                "state, created_at, updated_at) VALUES (%s, %s, %s, %s, 0, %s, %s, %s) "
                "ON CONFLICT (session_id) DO NOTHING RETURNING session_id",
                (
                    info.session_id,
                    info.host_id,
                    len(prefix),
                    len(prefix),
                    RecordingState.OPEN.value,
                    info.created_at,
                    info.updated_at,
                ),
            )
            if cur.fetchone() is None:
                return False  # another collector started it first; our object stays unnamed
            self._add_part(cur, info.session_id, 0, key, prefix)
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
        with self._write() as cur:
            cur.execute("SELECT * FROM recordings WHERE session_id = %s FOR UPDATE", (session_id,))
            row = cur.fetchone()
            if row is None:
                raise ConflictError("no recording started for this session", code="not_started")
            rec = recording_from_row(row)
            conflict = _conflict(rec, offset)
            if conflict is not None:
                raise conflict
            key = self.blobs.new_key(rec.host_id, session_id, offset)
            self.blobs.put(key, data)  # acknowledged by the store before the commit
            self._add_part(cur, session_id, offset, key, data)
            state = RecordingState.SEALED_VERIFIED if seal else RecordingState.OPEN
            cur.execute(
                "UPDATE recordings SET length = %s, frames = frames + %s, state = %s, "
                "updated_at = %s, verified_at = %s WHERE session_id = %s RETURNING *",
                (offset + len(data), frames, state.value, at, at if seal else None, session_id),
            )
            new = cur.fetchone()
            assert new is not None  # the row is locked by this transaction
        return recording_from_row(new)

    def read_recording(self, session_id: str, start: int, end: int) -> Iterator[bytes]:
        with self._snapshot() as cur:
            cur.execute("SELECT * FROM recordings WHERE session_id = %s", (session_id,))
            row = cur.fetchone()
            if row is None or not 0 <= start <= end <= row["length"]:
                raise StorageError("read outside the committed recording")
            cur.execute(
                "SELECT part_offset, length, object_key, sha256 FROM recording_parts "
                "WHERE session_id = %s AND part_offset < %s AND part_offset + length > %s "
                "ORDER BY part_offset",
                (session_id, end, start),
            )
            parts = [
                Part(r["part_offset"], r["length"], r["object_key"], bytes(r["sha256"]))
                for r in cur.fetchall()
            ]
        _check_cover(parts, start, end)
        return iter(self.blobs.read(parts, start, end))

    # --- holds and audit

    def add_hold(self, hold: Hold) -> None:
        with self._write() as cur:
            cur.execute(
                "INSERT INTO holds (hold_id, kind, value, reason, created_at, created_by) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    hold.hold_id,
                    hold.kind.value,
                    hold.value,
                    hold.reason,
                    hold.created_at,
                    hold.created_by,
                ),
            )

    def list_holds(self) -> list[Hold]:
        with self._read() as cur:
            rows = cur.execute("SELECT * FROM holds ORDER BY created_at, hold_id").fetchall()
        return [
            Hold(
                r["hold_id"],
                HoldKind(r["kind"]),
                r["value"],
                r["reason"],
                utc_req(r["created_at"]),
                r["created_by"],
            )
            for r in rows
        ]

    def remove_hold(self, hold_id: str) -> bool:
        with self._write() as cur:
            cur.execute("DELETE FROM holds WHERE hold_id = %s", (hold_id,))
            return cur.rowcount == 1

    def audit(self, event: AuditEvent) -> None:
        with self._write() as cur:
            cur.execute(
                "INSERT INTO audit_events (event_id, at, actor, action, subject, detail) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    self._next(cur, "audit"),
                    event.at,
                    event.actor,
                    event.action,
                    event.subject,
                    json.dumps(dict(event.detail), sort_keys=True),
                ),
            )

    def list_audit(self, after_id: int, limit: int) -> list[AuditEvent]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT * FROM audit_events WHERE event_id > %s ORDER BY event_id LIMIT %s",
                (after_id, limit),
            ).fetchall()
        return [
            AuditEvent(
                at=utc_req(r["at"]),
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
        with self._write() as cur:
            cur.execute("LOCK TABLE holds IN SHARE MODE")
            cur.execute(
                "SELECT s.target_id, s.user_email, s.recording_status, r.state "
                "FROM sessions s LEFT JOIN recordings r ON r.session_id = s.session_id "
                "WHERE s.session_id = %s FOR UPDATE OF s",
                (session_id,),
            )
            row = cur.fetchone()
            if row is None:
                return DeleteOutcome.MISSING
            if row["recording_status"] == "recording" or row["state"] == RecordingState.OPEN.value:
                return DeleteOutcome.OPEN
            cur.execute(
                "SELECT 1 FROM holds WHERE (kind = 'session' AND value = %s) "
                "OR (kind = 'user' AND value = %s) OR (kind = 'target' AND value = %s) LIMIT 1",
                (session_id, row["user_email"], row["target_id"]),
            )
            if cur.fetchone() is not None:
                return DeleteOutcome.HELD
            cur.execute(
                "DELETE FROM recording_parts WHERE session_id = %s RETURNING object_key",
                (session_id,),
            )
            keys = [r["object_key"] for r in cur.fetchall()]
            cur.execute("DELETE FROM recordings WHERE session_id = %s", (session_id,))
            cur.execute("DELETE FROM sessions WHERE session_id = %s", (session_id,))
            detail = {
                "session_id": session_id,
                "target_id": row["target_id"],
                "user_email": row["user_email"],
                "reason": reason,
            }
            cur.execute(
                "INSERT INTO audit_events (event_id, at, actor, action, subject, detail) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    self._next(cur, "audit"),
                    at,
                    RETENTION_ACTOR,
                    RETENTION_ACTION,
                    session_id,
                    json.dumps(detail, sort_keys=True),
                ),
            )
        try:
            self.blobs.delete(keys)
        except StorageError as exc:  # committed already: the bytes are unreferenced now
            log.error("retention: objects of %s left in the store: %s", session_id, exc.message)
        return DeleteOutcome.DELETED


def _check_cover(parts: list[Part], start: int, end: int) -> None:
    """The parts must tile ``[start, end)`` with no gap or overlap (defence in depth: the
    append rules make it so; a hand-edited table must not make us serve wrong bytes)."""
    pos = start
    for i, part in enumerate(parts):
        joins = part.offset <= pos < part.offset + part.length if i == 0 else part.offset == pos
        if not joins:
            raise StorageError("the recording's parts do not join up: not served")
        pos = part.offset + part.length
    if pos < end:
        raise StorageError("the recording's parts end before its committed length")
