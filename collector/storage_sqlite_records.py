"""Session records, authentication events and the export feed in the embedded database.

Invariants (storage.py): a stored record keeps its host; a finished record and every
event are immutable (a re-send of the same content is "unchanged"/"duplicate"); a batch of
events is stored whole or not at all; queries use only fixed column names, every value a
parameter; pages are newest first by a keyset ``(time, id)``, so a page costs one index
range scan however deep the listing goes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sshaudit.collector.models import AuthEvent, SessionRecord, parse_time, to_us
from sshaudit.collector.problems import ConflictError, ForbiddenError
from sshaudit.collector.storage import (
    AUTH_EVENT_FILTERS,
    SESSION_FILTERS,
    AuthEventQuery,
    Change,
    PutOutcome,
    RecordingInfo,
    RecordingState,
    SessionQuery,
    StoredAuthEvent,
    StoredSession,
)
from sshaudit.collector.storage_sql import EVENT_COLS, SESSION_COLS, SESSION_SELECT
from sshaudit.collector.storage_sqlite_db import Database, dt, dt_req, ts


def _insert(con: sqlite3.Connection, table: str, values: Mapping[str, object]) -> None:
    # Table and column names come from this module and the models' field names, never from
    # a request; every value is a parameter.
    cols = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    sql = f"INSERT INTO {table} ({cols}) VALUES ({marks})"  # noqa: S608
    con.execute(sql, tuple(values.values()))


def _session_values(record: SessionRecord) -> dict[str, Any]:
    doc = record.model_dump(mode="json")
    if doc["cert_serial"] is not None:
        doc["cert_serial"] = str(doc["cert_serial"])  # u64 does not fit SQLite's i64
    if doc["details"] is not None:
        doc["details"] = json.dumps(doc["details"], sort_keys=True, separators=(",", ":"))
    return doc


def _session_record(row: sqlite3.Row) -> SessionRecord:
    doc = {c: row[c] for c in SESSION_COLS}
    if doc["cert_serial"] is not None:
        doc["cert_serial"] = int(doc["cert_serial"])
    if doc["details"] is not None:
        doc["details"] = json.loads(doc["details"])
    return SessionRecord.model_validate(doc)


def recording_from_row(row: sqlite3.Row, prefix: str = "") -> RecordingInfo:
    return RecordingInfo(
        session_id=row["session_id"],
        host_id=row[prefix + "host_id"],
        header_length=row[prefix + "header_length"],
        length=row[prefix + "length"],
        frames=row[prefix + "frames"],
        state=RecordingState(row[prefix + "state"]),
        created_at=dt_req(row[prefix + "created_at"]),
        updated_at=dt_req(row[prefix + "updated_at"]),
        verified_at=dt(row[prefix + "verified_at"]),
    )


def _stored_session(row: sqlite3.Row) -> StoredSession:
    recording = None if row["r_host_id"] is None else recording_from_row(row, "r_")
    return StoredSession(
        record=_session_record(row),
        received_at=dt_req(row["received_at"]),
        updated_at=dt_req(row["updated_at"]),
        seq=row["seq"],
        recording=recording,
    )


def _event_values(event: AuthEvent) -> dict[str, Any]:
    doc = event.model_dump(mode="json")
    doc["allowed"] = 1 if event.allowed else 0
    if doc["cert_serial"] is not None:
        doc["cert_serial"] = str(doc["cert_serial"])
    return doc


def _stored_event(row: sqlite3.Row) -> StoredAuthEvent:
    doc = {c: row[c] for c in EVENT_COLS}
    doc["allowed"] = bool(doc["allowed"])
    if doc["cert_serial"] is not None:
        doc["cert_serial"] = int(doc["cert_serial"])
    return StoredAuthEvent(
        event=AuthEvent.model_validate(doc),
        received_at=dt_req(row["received_at"]),
        seq=row["seq"],
    )


def _where(
    filters: Mapping[str, object],
    allowed: Sequence[str],
    prefix: str,
    time_col: str,
    id_col: str,
    since_us: int | None,
    until_us: int | None,
    after: tuple[int, str] | None,
) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    for name, value in filters.items():
        if name not in allowed:  # column names come from this fixed list only
            raise ValueError(f"unknown filter {name!r}")
        clauses.append(f"{prefix}{name} = ?")
        params.append(int(value) if isinstance(value, bool) else value)
    if since_us is not None:
        clauses.append(f"{prefix}{time_col} >= ?")
        params.append(since_us)
    if until_us is not None:
        clauses.append(f"{prefix}{time_col} < ?")
        params.append(until_us)
    if after is not None:
        clauses.append(f"({prefix}{time_col}, {prefix}{id_col}) < (?, ?)")
        params.extend(after)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class RecordsDatabase(Database):
    """Sessions, events and the export feed on top of :class:`Database`."""

    def put_session(self, record: SessionRecord, at: datetime) -> PutOutcome:
        values = _session_values(record)
        with self._write() as con:
            row = con.execute(
                "SELECT * FROM sessions WHERE session_id = ?", (record.session_id,)
            ).fetchone()
            if row is not None:
                old = _session_record(row)
                if old.target_id != record.target_id:
                    raise ForbiddenError(
                        "this session belongs to another host", code="foreign_session"
                    )
                if old == record:
                    return PutOutcome.UNCHANGED
                if old.recording_status.value != "recording":
                    raise ConflictError(
                        f"the session record is final ({old.recording_status.value}) and "
                        "cannot change",
                        code="record_immutable",
                    )
            values.update(
                start_us=to_us(parse_time(record.session_start)),
                updated_at=ts(at),
                seq=self._next_seq(con),
            )
            if row is None:
                values["received_at"] = ts(at)
                _insert(con, "sessions", values)
                return PutOutcome.CREATED
            sets = ", ".join(f"{c} = ?" for c in values)
            sql = f"UPDATE sessions SET {sets} WHERE session_id = ?"  # noqa: S608 - see _insert
            con.execute(sql, (*values.values(), record.session_id))
            return PutOutcome.UPDATED

    def get_session(self, session_id: str) -> StoredSession | None:
        with self._read() as con:
            row = con.execute(SESSION_SELECT + " WHERE s.session_id = ?", (session_id,)).fetchone()
        return None if row is None else _stored_session(row)

    def query_sessions(self, query: SessionQuery) -> list[StoredSession]:
        where, params = _where(
            query.filters,
            SESSION_FILTERS,
            "s.",
            "start_us",
            "session_id",
            query.since_us,
            query.until_us,
            query.after,
        )
        sql = f"{SESSION_SELECT}{where} ORDER BY s.start_us DESC, s.session_id DESC LIMIT ?"
        with self._read() as con:
            rows = con.execute(sql, (*params, query.limit)).fetchall()
        return [_stored_session(r) for r in rows]

    def add_auth_events(self, events: Sequence[AuthEvent], at: datetime) -> tuple[int, int]:
        added = duplicates = 0
        with self._write() as con:
            for event in events:
                row = con.execute(
                    "SELECT * FROM auth_events WHERE event_id = ?", (event.event_id,)
                ).fetchone()
                if row is not None:
                    if _stored_event(row).event != event:
                        raise ConflictError(
                            f"event {event.event_id} is stored with other content",
                            code="event_conflict",
                            extra={"event_id": event.event_id},
                        )
                    duplicates += 1
                    continue
                values = _event_values(event)
                values.update(
                    created_us=to_us(parse_time(event.created_at)),
                    received_at=ts(at),
                    seq=self._next_seq(con),
                )
                _insert(con, "auth_events", values)
                added += 1
        return added, duplicates

    def query_auth_events(self, query: AuthEventQuery) -> list[StoredAuthEvent]:
        where, params = _where(
            query.filters,
            AUTH_EVENT_FILTERS,
            "",
            "created_us",
            "event_id",
            query.since_us,
            query.until_us,
            query.after,
        )
        order = " ORDER BY created_us DESC, event_id DESC LIMIT ?"
        sql = f"SELECT * FROM auth_events{where}{order}"  # noqa: S608 - see _where
        with self._read() as con:
            rows = con.execute(sql, (*params, query.limit)).fetchall()
        return [_stored_event(r) for r in rows]

    def changes(self, after_seq: int, limit: int) -> list[Change]:
        with self._snapshot() as con:
            srows = con.execute(
                SESSION_SELECT + " WHERE s.seq > ? ORDER BY s.seq LIMIT ?", (after_seq, limit)
            ).fetchall()
            erows = con.execute(
                "SELECT * FROM auth_events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            ).fetchall()
        out = [Change(r["seq"], session=_stored_session(r)) for r in srows]
        out += [Change(r["seq"], auth_event=_stored_event(r)) for r in erows]
        out.sort(key=lambda c: c.seq)
        return out[:limit]
