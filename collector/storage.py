"""The storage interface: everything above it (ingest rules, routes, CLI, export) sees only
:class:`Storage`; the embedded backend (SQLite + files) and the fleet backend (PostgreSQL +
an S3 object store) implement it.

Invariants every implementation keeps (tests/test_collector_storage.py checks them):
- recordings are append-only blobs: :meth:`Storage.append_recording` adds bytes at exactly
  the committed length, atomically with the metadata, durably (fsync, or the object store's
  acknowledged write) before it returns; bytes past the committed length are never served;
- a session record from one host never becomes another host's; a finished record (status
  other than ``recording``) never changes; an authentication event never changes;
- nothing in this interface deletes or rewrites a recording, a session record or an event,
  except :meth:`Storage.delete_expired`, called only by the retention job (retention.py; no
  HTTP route reaches it): it deletes one final, unheld session with its recording and logs
  a ``retention_delete`` audit event in the same transaction;
- values cross the interface as frozen dataclasses or frozen pydantic models, times as
  aware UTC datetimes; ids are already validated (collector/ids.py), yet the backends must
  not trust them to build paths or SQL (parameters only).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from sshaudit.collector.models import AuthEvent, SessionRecord


class TokenKind(Enum):
    """What a token may do (notes/issue4.md "Roles and tokens")."""

    AGENT = "agent"  # one-time enrollment token, exchanged at POST /v1/enroll
    HOST = "host"  # a host's credential: writes that host's sessions and events
    AUDITOR = "auditor"  # query and download
    ADMIN = "admin"  # tokens, keys, CA keys, policy, legal holds
    USER = "user"  # a person (email): asks the built-in user CA for an SSH certificate


class RecordingState(Enum):
    OPEN = "open"  # the prefix and zero or more frames are stored; more may come
    SEALED_VERIFIED = "sealed_verified"  # the trailer arrived and verified: closed for good


class PutOutcome(Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class HoldKind(Enum):
    """A legal hold suspends retention for one session, one user (user_email) or one host."""

    SESSION = "session"
    USER = "user"
    TARGET = "target"


class DeleteOutcome(Enum):
    """What :meth:`Storage.delete_expired` did; anything but DELETED changed nothing."""

    DELETED = "deleted"
    MISSING = "missing"  # no such session record (already deleted)
    HELD = "held"  # a legal hold names the session, its user or its host
    OPEN = "open"  # still recording, or its recording is not sealed yet


RETENTION_ACTION = "retention_delete"
RETENTION_ACTOR = "retention"


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    kind: TokenKind
    digest: bytes  # SHA-256 of the token string; the token itself is never stored
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    used_at: datetime | None = None  # enrollment tokens: when they were exchanged
    host_id: str | None = None  # host credentials: the host; enrollment tokens: once used
    comment: str = ""
    email: str | None = None  # user tokens: whose (the certificate key id); others: None


@dataclass(frozen=True)
class Host:
    host_id: str
    hostname: str
    public_key: bytes  # the host's Ed25519 signing key, 32 raw bytes
    enrolled_at: datetime
    enrollment_token_id: str
    backlog_sessions: int = 0
    backlog_bytes: int = 0
    backlog_at: datetime | None = None
    last_seen: datetime | None = None


@dataclass(frozen=True)
class AuditorKey:
    kid: str
    public_key: bytes  # X25519, 32 raw bytes
    comment: str
    added_at: datetime


@dataclass(frozen=True)
class CaKey:
    key_id: str  # lowercase hex SHA-256 of the key blob
    line: str  # "type base64 [comment]", as in TrustedUserCAKeys (sshd(8) AUTHORIZED_KEYS)
    fingerprint: str  # OpenSSH style "SHA256:<base64 without padding>"
    added_at: datetime


@dataclass(frozen=True)
class Policy:
    document: Mapping[str, Any]
    version: int
    updated_at: datetime | None


@dataclass(frozen=True)
class RecordingInfo:
    session_id: str
    host_id: str
    header_length: int  # bytes of magic + header length + header: where frames start
    length: int  # committed bytes
    frames: int
    state: RecordingState
    created_at: datetime
    updated_at: datetime
    verified_at: datetime | None = None


@dataclass(frozen=True)
class StoredSession:
    record: SessionRecord
    received_at: datetime
    updated_at: datetime
    seq: int
    recording: RecordingInfo | None = None


@dataclass(frozen=True)
class StoredAuthEvent:
    event: AuthEvent
    received_at: datetime
    seq: int


@dataclass(frozen=True)
class Hold:
    hold_id: str
    kind: HoldKind
    value: str
    reason: str
    created_at: datetime
    created_by: str


@dataclass(frozen=True)
class AuditEvent:
    """Something an operator should be able to find later (a token made, a key removed,
    an enrollment, a recording verified or refused). ``event_id`` is assigned on insert."""

    at: datetime
    actor: str  # "token:<id>", "cli", "collector"
    action: str
    subject: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    event_id: int = 0


@dataclass(frozen=True)
class SessionQuery:
    """Exact-match filters (None: any), a time range on ``session_start`` in microseconds
    since the epoch (``since`` inclusive, ``until`` exclusive), and a keyset cursor: the
    ``(start_us, session_id)`` of the last row of the previous page (newest first)."""

    filters: Mapping[str, str] = field(default_factory=dict)
    since_us: int | None = None
    until_us: int | None = None
    after: tuple[int, str] | None = None
    limit: int = 100


@dataclass(frozen=True)
class AuthEventQuery:
    filters: Mapping[str, str | bool] = field(default_factory=dict)
    since_us: int | None = None
    until_us: int | None = None
    after: tuple[int, str] | None = None
    limit: int = 100


@dataclass(frozen=True)
class Change:
    """One entry of the export feed, in ``seq`` order."""

    seq: int
    session: StoredSession | None = None
    auth_event: StoredAuthEvent | None = None


SESSION_FILTERS = (
    "user_email",
    "unix_user",
    "target_id",
    "hostname",
    "client_address",
    "program_type",
    "recording_status",
)
AUTH_EVENT_FILTERS = ("user_email", "unix_user", "target_id", "ip_address", "method", "allowed")


class Storage(Protocol):
    """What the collector needs from a backend. Methods raise
    :class:`~sshaudit.collector.problems.CollectorError` subclasses: ``ConflictError`` and
    ``ForbiddenError`` for the rules above, ``StorageError``/``StorageFullError`` for failures."""

    def close(self) -> None: ...
    def ping(self) -> None:
        """Raise StorageError unless the backend answers (for /healthz)."""
        ...

    # --- tokens and hosts
    def add_token(self, token: TokenRecord) -> None: ...
    def token_by_digest(self, digest: bytes) -> TokenRecord | None: ...
    def list_tokens(self) -> list[TokenRecord]: ...
    def revoke_token(self, token_id: str, at: datetime) -> TokenRecord | None: ...
    def enroll_host(self, enrollment: TokenRecord, host: Host, credential: TokenRecord) -> None:
        """Atomically: mark ``enrollment`` used (ConflictError if it already is, or is revoked),
        add ``host`` and its ``credential``."""
        ...

    def get_host(self, host_id: str) -> Host | None: ...
    def list_hosts(self) -> list[Host]: ...
    def report_backlog(self, host_id: str, sessions: int, nbytes: int, at: datetime) -> None: ...

    # --- auditor keys, user CA keys, policy
    def add_auditor_key(self, key: AuditorKey) -> bool: ...
    def list_auditor_keys(self) -> list[AuditorKey]: ...
    def remove_auditor_key(self, kid: str) -> bool: ...
    def add_ca_key(self, key: CaKey) -> bool: ...
    def list_ca_keys(self) -> list[CaKey]: ...
    def remove_ca_key(self, key_id: str) -> bool: ...
    def get_policy(self) -> Policy: ...
    def set_policy(self, document: Mapping[str, Any], at: datetime) -> Policy: ...

    # --- session records and authentication events
    def put_session(self, record: SessionRecord, at: datetime) -> PutOutcome:
        """Create or update. ForbiddenError (``foreign_session``) if the stored record has another
        ``target_id``; ConflictError (``record_immutable``) if it is finished and differs."""
        ...

    def get_session(self, session_id: str) -> StoredSession | None: ...
    def query_sessions(self, query: SessionQuery) -> list[StoredSession]: ...
    def add_auth_events(self, events: Sequence[AuthEvent], at: datetime) -> tuple[int, int]:
        """Store new events, all or none; returns (added, duplicates). ConflictError
        (``event_conflict``) if an ``event_id`` is stored with other content."""
        ...

    def query_auth_events(self, query: AuthEventQuery) -> list[StoredAuthEvent]: ...

    # --- recordings (append-only blobs)
    def get_recording(self, session_id: str) -> RecordingInfo | None: ...
    def start_recording(self, info: RecordingInfo, prefix: bytes) -> bool:
        """Store the prefix durably; False (nothing changed) if the session has one."""
        ...

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
        """Append ``data`` (``frames`` whole frames, and the trailer if ``seal``) at exactly
        ``offset``; ConflictError with ``extra={"length": ...}`` if that is not the committed
        length (another writer won), or if the recording is sealed."""
        ...

    def read_recording(self, session_id: str, start: int, end: int) -> Iterator[bytes]:
        """The committed bytes ``[start, end)`` in pieces; ``end`` <= committed length."""
        ...

    # --- legal holds and the audit log
    def add_hold(self, hold: Hold) -> None: ...
    def list_holds(self) -> list[Hold]: ...
    def remove_hold(self, hold_id: str) -> bool: ...
    def audit(self, event: AuditEvent) -> None: ...
    def list_audit(self, after_id: int, limit: int) -> list[AuditEvent]: ...

    # --- retention (collector/retention.py only)
    def delete_expired(self, session_id: str, reason: str, at: datetime) -> DeleteOutcome:
        """Delete a session record and its recording, and add a :data:`RETENTION_ACTION`
        audit event (session id, target, user, reason), in one transaction; re-checks
        there that no hold names it and that it is final (HELD/OPEN otherwise, nothing
        changed). Recording bytes go after the commit: a crash in between leaves bytes
        nothing refers to (never served), not a record without its bytes."""
        ...

    # --- export feed
    def changes(self, after_seq: int, limit: int) -> list[Change]: ...


def open_storage(data_dir: Path) -> Storage:
    """The storage of a collector state directory (made by ``sshaudit-collector init``).
    Only this function knows which backend serves it: ``DATA/collector.toml``
    (storage_pg_config.py) names the fleet backend (PostgreSQL + S3); without it, the
    embedded SQLite database and recording files inside the directory."""
    from sshaudit.collector.storage_pg_config import Backend, load_config

    config = load_config(data_dir)
    if config.backend is Backend.POSTGRESQL_S3:
        from sshaudit.collector.storage_pg import PgS3Storage

        assert config.postgresql is not None and config.s3 is not None  # parse_config's rule
        return PgS3Storage(config.postgresql, config.s3)
    from sshaudit.collector.storage_sqlite import SqliteStorage

    return SqliteStorage(data_dir)
