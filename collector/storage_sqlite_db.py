"""The SQLite plumbing of the embedded backend: connections, transactions, migrations.

Invariants:
- WAL journal (several readers alongside one writer, and other processes such as the CLI
  on the same file), ``synchronous=FULL`` (a committed transaction survives power loss,
  which an upload's 200 promises), foreign keys on, a busy timeout instead of instant
  "database is locked" errors;
- a connection is used by one thread at a time: connections wait in a pool and are taken
  for one operation; every write runs in ``BEGIN IMMEDIATE`` (the write lock up front, so
  two writers never deadlock upgrading read locks), committed or rolled back as a whole;
- writers queue on a lock of their own before SQLite's (a thread lock, then ``flock`` on
  ``<db>.wlock`` for the other processes: ``serve --workers N``, the CLI): SQLite's busy
  handler sleeps in growing steps while another process writes, which cut small-upload
  throughput by 4x with two server processes; a blocked ``flock`` wakes as soon as the
  lock is free (docs/benchmarks.md);
- every statement is parameterised: no value is ever formatted into SQL text;
- SQLite errors are translated at this boundary (:class:`StorageFullError` for a full disk,
  :class:`StorageError` otherwise); ``IntegrityError`` passes through for callers to judge.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from sshaudit.collector.models import format_time, parse_time
from sshaudit.collector.problems import StorageError, StorageFullError
from sshaudit.collector.storage_sqlite_schema import MIGRATIONS

BUSY_TIMEOUT_S = 30.0
_FULL_CODES = {13}  # SQLITE_FULL (https://sqlite.org/rescode.html#full)


def ts(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def dt(text: str | None) -> datetime | None:
    return None if text is None else parse_time(text)


def dt_req(text: str) -> datetime:
    return parse_time(text)


def _translate(exc: sqlite3.Error) -> StorageError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code in _FULL_CODES or "database or disk is full" in str(exc):
        return StorageFullError("the collector's disk is full (database)")
    return StorageError(f"database error: {exc}")


class Database:
    """A pool of connections to one SQLite file, migrated to the newest schema on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # 0600 from the start: SQLite gives its -wal and -shm files the database's mode.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._write_lock = threading.Lock()
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._write_fd = os.open(f"{path}.wlock", flags, 0o600)
        with self._conn() as con:
            try:
                con.execute("PRAGMA journal_mode=WAL")
                _migrate(con)
            except sqlite3.Error as exc:
                raise _translate(exc) from exc

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        con.row_factory = sqlite3.Row
        self._all.append(con)
        return con

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        try:
            con = self._idle.get_nowait()
        except queue.Empty:
            con = self._connect()
        try:
            yield con
        finally:
            if con.in_transaction:  # an exception between BEGIN and COMMIT
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
            self._idle.put(con)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads; several statements see one snapshot only inside
        :meth:`_snapshot`."""
        with self._conn() as con:
            try:
                yield con
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise _translate(exc) from exc

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        with self._read() as con:
            con.execute("BEGIN")
            try:
                yield con
            finally:
                con.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock, self._flock(), self._read() as con:
            con.execute("BEGIN IMMEDIATE")
            yield con
            con.execute("COMMIT")

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        fcntl.flock(self._write_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._write_fd, fcntl.LOCK_UN)

    def _next_seq(self, con: sqlite3.Connection) -> int:
        row = con.execute("UPDATE sequence SET value = value + 1 WHERE id = 1 RETURNING value")
        return int(row.fetchone()[0])

    def close(self) -> None:
        for con in self._all:
            with contextlib.suppress(sqlite3.Error):
                con.close()
        self._all.clear()
        with contextlib.suppress(OSError):
            os.close(self._write_fd)

    def ping(self) -> None:
        with self._read() as con:
            con.execute("SELECT 1 FROM policy").fetchone()

    def schema_version(self) -> int:
        with self._read() as con:
            row = con.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            return int(row[0] or 0)


def _migrate(con: sqlite3.Connection) -> None:
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    newest = max(v for v, _ in MIGRATIONS)
    (have,) = con.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    if have > newest:
        raise StorageError(
            f"the database has schema version {have}, newer than this collector knows "
            f"({newest}): upgrade the collector"
        )
    for version, statements in MIGRATIONS:
        con.execute("BEGIN IMMEDIATE")
        try:
            done = con.execute(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
            ).fetchone()
            if done is None:
                for statement in statements:
                    con.execute(statement)
                con.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, format_time(datetime.now(UTC))),
                )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
