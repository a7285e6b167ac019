"""SQL text both database backends share (storage_sqlite_records.py, storage_pg_records.py).

Invariant: only fixed table and column names from this module and the models' field names
appear here, never a value; each backend adds its own placeholders (``?`` or ``%s``).
"""

from __future__ import annotations

from sshaudit.collector.models import AuthEvent, SessionRecord

SESSION_COLS = tuple(SessionRecord.model_fields)
EVENT_COLS = tuple(AuthEvent.model_fields)
REC_COLS = (
    "host_id",
    "header_length",
    "length",
    "frames",
    "state",
    "created_at",
    "updated_at",
    "verified_at",
)
# One SELECT for a session and its recording: the recording's columns get an r_ prefix.
SESSION_SELECT = (
    "SELECT s.*, "  # noqa: S608 - fixed column names
    + ", ".join(f"r.{c} AS r_{c}" for c in REC_COLS)
    + " FROM sessions s LEFT JOIN recordings r ON r.session_id = s.session_id"
)
