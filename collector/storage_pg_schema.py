"""The PostgreSQL schema of the fleet backend, as numbered migrations (PostgreSQL 13+).

Invariants: a migration, once released, never changes: a new schema is a new number appended
here; each runs in one transaction together with its row in ``schema_migrations``, under a
transaction-level advisory lock, so two collectors starting at once apply it once and a crash
leaves either the old schema or the new one; a database whose newest migration is unknown to
this collector (made by a newer version) is refused, not used.

The columns mirror the embedded schema (storage_sqlite_schema.py) with native types: times
are ``timestamptz``, keys ``bytea``, ``cert_serial`` ``numeric(20)`` (a u64 does not fit a
``bigint``); ``session_start``/``created_at`` keep the record's RFC 3339 text beside an
integer of microseconds that sorting, filtering and the keyset cursor use. Identifiers are
``COLLATE "C"``: byte order, as in SQLite, so the cursor means the same on both backends.

``counters`` holds ``seq`` (the export feed) and ``audit`` (the audit log's ids). Taking the
next value locks the counter's row until commit, so values become visible in the order they
were given: a reader paging with "after N" never skips a row a slower transaction commits
later (a SEQUENCE would give no such order). A recording's bytes are in S3, one object per
acknowledged append; ``recording_parts`` lists them, with their SHA-256, and is the only
way a read finds them, so an object never committed is never served.
"""

from __future__ import annotations

_ID = 'text COLLATE "C"'

_SESSION_INDEXES = tuple(
    f"CREATE INDEX sessions_{col} ON sessions ({col}, start_us DESC, session_id DESC)"
    for col in ("user_email", "unix_user", "target_id", "hostname", "client_address")
)
_EVENT_INDEXES = tuple(
    f"CREATE INDEX auth_events_{col} ON auth_events ({col}, created_us DESC, event_id DESC)"
    for col in ("user_email", "unix_user", "target_id", "ip_address")
)

V1 = (
    f"""CREATE TABLE tokens (
        token_id {_ID} PRIMARY KEY, kind text NOT NULL, digest bytea NOT NULL UNIQUE,
        created_at timestamptz NOT NULL, expires_at timestamptz, revoked_at timestamptz,
        used_at timestamptz, host_id {_ID}, comment text NOT NULL)""",
    f"""CREATE TABLE hosts (
        host_id {_ID} PRIMARY KEY, hostname text NOT NULL, public_key bytea NOT NULL,
        enrolled_at timestamptz NOT NULL, enrollment_token_id {_ID} NOT NULL,
        backlog_sessions bigint NOT NULL DEFAULT 0, backlog_bytes bigint NOT NULL DEFAULT 0,
        backlog_at timestamptz, last_seen timestamptz)""",
    f"""CREATE TABLE auditor_keys (
        kid {_ID} PRIMARY KEY, public_key bytea NOT NULL, comment text NOT NULL,
        added_at timestamptz NOT NULL)""",
    f"""CREATE TABLE ca_keys (
        key_id {_ID} PRIMARY KEY, line text NOT NULL, fingerprint text NOT NULL,
        added_at timestamptz NOT NULL)""",
    """CREATE TABLE policy (
        id integer PRIMARY KEY CHECK (id = 1), document text NOT NULL,
        version bigint NOT NULL, updated_at timestamptz)""",
    "INSERT INTO policy (id, document, version, updated_at) VALUES (1, '{}', 0, NULL)",
    "CREATE TABLE counters (name text PRIMARY KEY, value bigint NOT NULL)",
    "INSERT INTO counters (name, value) VALUES ('seq', 0), ('audit', 0)",
    f"""CREATE TABLE sessions (
        session_id {_ID} PRIMARY KEY, target_id {_ID} NOT NULL, user_email text NOT NULL,
        unix_user text NOT NULL, hostname text NOT NULL, client_address text NOT NULL,
        client_port integer, server_address text NOT NULL, server_port integer,
        session_start text NOT NULL, start_us bigint NOT NULL, session_finish text,
        program_type text, command text, exit_status integer, error text,
        recording_status text NOT NULL, bytes_in bigint NOT NULL, bytes_out bigint NOT NULL,
        cert_serial numeric(20, 0), cert_fingerprint text NOT NULL, principal text NOT NULL,
        details text, received_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
        seq bigint NOT NULL)""",
    "CREATE INDEX sessions_start ON sessions (start_us DESC, session_id DESC)",
    "CREATE INDEX sessions_seq ON sessions (seq)",
    *_SESSION_INDEXES,
    f"""CREATE TABLE auth_events (
        event_id {_ID} PRIMARY KEY, target_id {_ID} NOT NULL, created_at text NOT NULL,
        created_us bigint NOT NULL, user_email text NOT NULL, unix_user text NOT NULL,
        ip_address text NOT NULL, method text NOT NULL, allowed boolean NOT NULL,
        reason text NOT NULL, cert_serial numeric(20, 0), cert_fingerprint text NOT NULL,
        session_id {_ID}, received_at timestamptz NOT NULL, seq bigint NOT NULL)""",
    "CREATE INDEX auth_events_created ON auth_events (created_us DESC, event_id DESC)",
    "CREATE INDEX auth_events_seq ON auth_events (seq)",
    *_EVENT_INDEXES,
    f"""CREATE TABLE recordings (
        session_id {_ID} PRIMARY KEY, host_id {_ID} NOT NULL, header_length bigint NOT NULL,
        length bigint NOT NULL, frames bigint NOT NULL, state text NOT NULL,
        created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
        verified_at timestamptz)""",
    f"""CREATE TABLE recording_parts (
        session_id {_ID} NOT NULL REFERENCES recordings (session_id),
        part_offset bigint NOT NULL, length bigint NOT NULL CHECK (length > 0),
        object_key text NOT NULL, sha256 bytea NOT NULL,
        PRIMARY KEY (session_id, part_offset))""",
    f"""CREATE TABLE holds (
        hold_id {_ID} PRIMARY KEY, kind text NOT NULL, value text NOT NULL,
        reason text NOT NULL, created_at timestamptz NOT NULL, created_by text NOT NULL)""",
    """CREATE TABLE audit_events (
        event_id bigint PRIMARY KEY, at timestamptz NOT NULL, actor text NOT NULL,
        action text NOT NULL, subject text NOT NULL, detail text NOT NULL)""",
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
V3 = ("ALTER TABLE tokens ADD COLUMN email text",)

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = ((1, V1), (2, V2), (3, V3))
