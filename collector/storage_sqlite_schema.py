"""The embedded database's schema, as numbered migrations (SQLite 3.35+ dialect).

Invariants: a migration, once released, never changes: a new schema is a new number
appended here; each runs in one transaction together with its row in ``schema_migrations``,
so a crash leaves either the old schema or the new one; a database whose newest migration
is unknown to this collector (made by a newer version) is refused, not used.

Times are stored as RFC 3339 UTC text (``...Z``), plus an integer of microseconds since the
epoch where rows are sorted or filtered by time. ``seq`` orders the export feed: every
change to a session record or a new event takes the next value of ``sequence``.
"""

from __future__ import annotations

_SESSION_INDEXES = tuple(
    f"CREATE INDEX sessions_{col} ON sessions ({col}, start_us DESC, session_id DESC)"
    for col in ("user_email", "unix_user", "target_id", "hostname", "client_address")
)
_EVENT_INDEXES = tuple(
    f"CREATE INDEX auth_events_{col} ON auth_events ({col}, created_us DESC, event_id DESC)"
    for col in ("user_email", "unix_user", "target_id", "ip_address")
)

V1 = (
    """CREATE TABLE tokens (
        token_id TEXT PRIMARY KEY, kind TEXT NOT NULL, digest BLOB NOT NULL UNIQUE,
        created_at TEXT NOT NULL, expires_at TEXT, revoked_at TEXT, used_at TEXT,
        host_id TEXT, comment TEXT NOT NULL)""",
    """CREATE TABLE hosts (
        host_id TEXT PRIMARY KEY, hostname TEXT NOT NULL, public_key BLOB NOT NULL,
        enrolled_at TEXT NOT NULL, enrollment_token_id TEXT NOT NULL,
        backlog_sessions INTEGER NOT NULL DEFAULT 0, backlog_bytes INTEGER NOT NULL DEFAULT 0,
        backlog_at TEXT, last_seen TEXT)""",
    """CREATE TABLE auditor_keys (
        kid TEXT PRIMARY KEY, public_key BLOB NOT NULL, comment TEXT NOT NULL,
        added_at TEXT NOT NULL)""",
    """CREATE TABLE ca_keys (
        key_id TEXT PRIMARY KEY, line TEXT NOT NULL, fingerprint TEXT NOT NULL,
        added_at TEXT NOT NULL)""",
    """CREATE TABLE policy (
        id INTEGER PRIMARY KEY CHECK (id = 1), document TEXT NOT NULL,
        version INTEGER NOT NULL, updated_at TEXT)""",
    "INSERT INTO policy (id, document, version, updated_at) VALUES (1, '{}', 0, NULL)",
    "CREATE TABLE sequence (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)",
    "INSERT INTO sequence (id, value) VALUES (1, 0)",
    """CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY, target_id TEXT NOT NULL, user_email TEXT NOT NULL,
        unix_user TEXT NOT NULL, hostname TEXT NOT NULL, client_address TEXT NOT NULL,
        client_port INTEGER, server_address TEXT NOT NULL, server_port INTEGER,
        session_start TEXT NOT NULL, start_us INTEGER NOT NULL, session_finish TEXT,
        program_type TEXT, command TEXT, exit_status INTEGER, error TEXT,
        recording_status TEXT NOT NULL, bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
        cert_serial TEXT, cert_fingerprint TEXT NOT NULL, principal TEXT NOT NULL,
        details TEXT, received_at TEXT NOT NULL, updated_at TEXT NOT NULL,
        seq INTEGER NOT NULL)""",
    "CREATE INDEX sessions_start ON sessions (start_us DESC, session_id DESC)",
    "CREATE INDEX sessions_seq ON sessions (seq)",
    *_SESSION_INDEXES,
    """CREATE TABLE auth_events (
        event_id TEXT PRIMARY KEY, target_id TEXT NOT NULL, created_at TEXT NOT NULL,
        created_us INTEGER NOT NULL, user_email TEXT NOT NULL, unix_user TEXT NOT NULL,
        ip_address TEXT NOT NULL, method TEXT NOT NULL, allowed INTEGER NOT NULL,
        reason TEXT NOT NULL, cert_serial TEXT, cert_fingerprint TEXT NOT NULL,
        session_id TEXT, received_at TEXT NOT NULL, seq INTEGER NOT NULL)""",
    "CREATE INDEX auth_events_created ON auth_events (created_us DESC, event_id DESC)",
    "CREATE INDEX auth_events_seq ON auth_events (seq)",
    *_EVENT_INDEXES,
    """CREATE TABLE recordings (
        session_id TEXT PRIMARY KEY, host_id TEXT NOT NULL, header_length INTEGER NOT NULL,
        length INTEGER NOT NULL, frames INTEGER NOT NULL, state TEXT NOT NULL,
        created_at TEXT NOT NULL, updated_at TEXT NOT NULL, verified_at TEXT)""",
    """CREATE TABLE holds (
        hold_id TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL,
        reason TEXT NOT NULL, created_at TEXT NOT NULL, created_by TEXT NOT NULL)""",
    """CREATE TABLE audit_events (
        event_id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, actor TEXT NOT NULL,
        action TEXT NOT NULL, subject TEXT NOT NULL, detail TEXT NOT NULL)""",
)

# V2: the two enum filters of GET /v1/sessions got no index in V1, so a rare value
# (recording_status=recorder_lost, about 1% of sessions) walked the time index row by row
# until a page filled: p99 72 ms over 20,000 records (bench/collector.py, goal <= 50 ms).
V2 = tuple(
    f"CREATE INDEX sessions_{col} ON sessions ({col}, start_us DESC, session_id DESC)"
    for col in ("program_type", "recording_status")
)

# V3: user tokens (role ``user``) carry the email the built-in user CA certifies as the key
# id (collector/user_ca.py); NULL for every other kind.
V3 = ("ALTER TABLE tokens ADD COLUMN email TEXT",)

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = ((1, V1), (2, V2), (3, V3))
