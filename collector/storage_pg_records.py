"""Session records, authentication events and the export feed in PostgreSQL.

Invariants (storage.py), as storage_sqlite_records.py keeps them, and for several collector
processes at once:
- a stored record keeps its host; a finished record and every event are immutable (a
  re-send of the same content is "unchanged"/"duplicate"); a batch of events is stored
  whole or not at all;
- two collectors writing one session serialise on its row (``SELECT ... FOR UPDATE``); two
  creating it at once: the second's insert finds the first's row and the whole check runs
  again, so the ownership and finality rules hold across processes;
- every change takes its ``seq`` from the ``seq`` counter as its last step before commit
  (locks are always taken in the order session row, then counter), so the export feed sees
  changes in commit order and never skips one;
- queries use fixed column names only, every value a parameter; pages are newest first by
  a keyset ``(time, id)`` with ids in byte order (``COLLATE "C"``), as on SQLite.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg import sql

from sshaudit.collector.models import AuthEvent, SessionRecord, parse_time, to_us
from sshaudit.collector.problems import ConflictError, ForbiddenError, StorageError
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
from sshaudit.collector.storage_pg_db import Cursor, PgDatabase, utc, utc_req
from sshaudit.collector.storage_sql import EVENT_COLS, SESSION_COLS, SESSION_SELECT

_PUT_ATTEMPTS = 5


def _insert(cur: Cursor, table: str, values: Mapping[str, object]) -> None:
    # Names come from this module and the models' field names, never from a request.
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(table),
        sql.SQL(", ").join(sql.Identifier(c) for c in values),
        sql.SQL(", ").join(sql.Placeholder() for _ in values),
    )
    cur.execute(query, tuple(values.values()))


def _session_values(record: SessionRecord) -> dict[str, Any]:
    doc = record.model_dump(mode="json")
    if doc["details"] is not None:
        doc["details"] = json.dumps(doc["details"], sort_keys=True, separators=(",", ":"))
    return doc


def _serial(value: Decimal | int | None) -> int | None:
    return None if value is None else int(value)


def _session_record(row: Mapping[str, Any]) -> SessionRecord:
    doc = {c: row[c] for c in SESSION_COLS}
    doc["cert_serial"] = _serial(doc["cert_serial"])
    if doc["details"] is not None:
        doc["details"] = json.loads(doc["details"])
    return SessionRecord.model_validate(doc)


def recording_from_row(row: Mapping[str, Any], prefix: str = "") -> RecordingInfo:
    return RecordingInfo(
        session_id=row["session_id"],
        host_id=row[prefix + "host_id"],
        header_length=row[prefix + "header_length"],
        length=row[prefix + "length"],
        frames=row[prefix + "frames"],
        state=RecordingState(row[prefix + "state"]),
        created_at=utc_req(row[prefix + "created_at"]),
        updated_at=utc_req(row[prefix + "updated_at"]),
        verified_at=utc(row[prefix + "verified_at"]),
    )


def _stored_session(row: Mapping[str, Any]) -> StoredSession:
    recording = None if row["r_host_id"] is None else recording_from_row(row, "r_")
    return StoredSession(
        record=_session_record(row),
        received_at=utc_req(row["received_at"]),
        updated_at=utc_req(row["updated_at"]),
        seq=row["seq"],
        recording=recording,
    )


def _stored_event(row: Mapping[str, Any]) -> StoredAuthEvent:
    doc = {c: row[c] for c in EVENT_COLS}
    doc["cert_serial"] = _serial(doc["cert_serial"])
    return StoredAuthEvent(
        event=AuthEvent.model_validate(doc),
        received_at=utc_req(row["received_at"]),
        seq=row["seq"],
    )


def _where(
    filters: Mapping[str, object],
    allowed: Sequence[str],
    prefix: str,
    time_col: str,
    id_col: str,
    query: SessionQuery | AuthEventQuery,
) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    for name, value in filters.items():
        if name not in allowed:  # column names come from this fixed list only
            raise ValueError(f"unknown filter {name!r}")
        clauses.append(f"{prefix}{name} = %s")
        params.append(value)
    if query.since_us is not None:
        clauses.append(f"{prefix}{time_col} >= %s")
        params.append(query.since_us)
    if query.until_us is not None:
        clauses.append(f"{prefix}{time_col} < %s")
        params.append(query.until_us)
    if query.after is not None:
        clauses.append(f"({prefix}{time_col}, {prefix}{id_col}) < (%s, %s)")
        params.extend(query.after)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class _RowRaceError(Exception):
    """Another collector created the row this transaction meant to create: run it again."""


class PgRecords(PgDatabase):
    """Sessions, events and the export feed on top of :class:`PgDatabase`."""

    def put_session(self, record: SessionRecord, at: datetime) -> PutOutcome:
        for _ in range(_PUT_ATTEMPTS):
            try:
                return self._put_session(record, at)
            except _RowRaceError:
                continue
        raise StorageError("the session record kept changing under this write; retry")

    def _put_session(self, record: SessionRecord, at: datetime) -> PutOutcome:
        values = _session_values(record)
        with self._write() as cur:
            cur.execute(
                "SELECT * FROM sessions WHERE session_id = %s FOR UPDATE", (record.session_id,)
            )
            row = cur.fetchone()
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
            values.update(start_us=to_us(parse_time(record.session_start)), updated_at=at)
            values["seq"] = self._next(cur, "seq")
            if row is None:
                values["received_at"] = at
                cols = sql.SQL(", ").join(sql.Identifier(c) for c in values)
                marks = sql.SQL(", ").join(sql.Placeholder() for _ in values)
                cur.execute(
                    sql.SQL(
                        "INSERT INTO sessions ({}) VALUES ({}) "
                        "ON CONFLICT (session_id) DO NOTHING RETURNING session_id"
                    ).format(cols, marks),
                    tuple(values.values()),
                )
                if cur.fetchone() is None:
                    raise _RowRaceError  # rolls back, the seq too
                return PutOutcome.CREATED
            sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in values)
            cur.execute(
                sql.SQL("UPDATE sessions SET {} WHERE session_id = %s").format(sets),
                (*values.values(), record.session_id),
            )
            return PutOutcome.UPDATED

    def get_session(self, session_id: str) -> StoredSession | None:
        with self._read() as cur:
            cur.execute(SESSION_SELECT + " WHERE s.session_id = %s", (session_id,))
            row = cur.fetchone()
        return None if row is None else _stored_session(row)

    def query_sessions(self, query: SessionQuery) -> list[StoredSession]:
        where, params = _where(
            query.filters, SESSION_FILTERS, "s.", "start_us", "session_id", query
        )
        text = f"{SESSION_SELECT}{where} ORDER BY s.start_us DESC, s.session_id DESC LIMIT %s"
        with self._read() as cur:
            cur.execute(text, (*params, query.limit))
            rows = cur.fetchall()
        return [_stored_session(r) for r in rows]

    def add_auth_events(self, events: Sequence[AuthEvent], at: datetime) -> tuple[int, int]:
        added = duplicates = 0
        with self._write() as cur:
            # The counter first: one batch at a time, so two collectors storing the same
            # event id never race on the insert (and the feed stays in commit order).
            cur.execute("SELECT value FROM counters WHERE name = 'seq' FOR UPDATE")
            for event in events:
                cur.execute("SELECT * FROM auth_events WHERE event_id = %s", (event.event_id,))
                row = cur.fetchone()
                if row is not None:
                    if _stored_event(row).event != event:
                        raise ConflictError(
                            f"event {event.event_id} is stored with other content",
                            code="event_conflict",
                            extra={"event_id": event.event_id},
                        )
                    duplicates += 1
                    continue
                values = event.model_dump(mode="json")
                values.update(
                    created_us=to_us(parse_time(event.created_at)),
                    received_at=at,
                    seq=self._next(cur, "seq"),
                )
                _insert(cur, "auth_events", values)
                added += 1
        return added, duplicates

    def query_auth_events(self, query: AuthEventQuery) -> list[StoredAuthEvent]:
        where, params = _where(
            query.filters, AUTH_EVENT_FILTERS, "", "created_us", "event_id", query
        )
        order = " ORDER BY created_us DESC, event_id DESC LIMIT %s"
        text = f"SELECT * FROM auth_events{where}{order}"  # noqa: S608 - see _where
        with self._read() as cur:
            cur.execute(text, (*params, query.limit))
            rows = cur.fetchall()
        return [_stored_event(r) for r in rows]

    def changes(self, after_seq: int, limit: int) -> list[Change]:
        with self._snapshot() as cur:
            cur.execute(
                SESSION_SELECT + " WHERE s.seq > %s ORDER BY s.seq LIMIT %s", (after_seq, limit)
            )
            srows = cur.fetchall()
            cur.execute(
                "SELECT * FROM auth_events WHERE seq > %s ORDER BY seq LIMIT %s",
                (after_seq, limit),
            )
            erows = cur.fetchall()
        out = [Change(r["seq"], session=_stored_session(r)) for r in srows]
        out += [Change(r["seq"], auth_event=_stored_event(r)) for r in erows]
        out.sort(key=lambda c: c.seq)
        return out[:limit]
