"""The PostgreSQL plumbing of the fleet backend (psycopg 3): a bounded connection pool,
transactions, error translation, migrations.

Invariants:
- every connection is set up the same way before use: ``TIME ZONE 'UTC'``, the configured
  ``search_path``, ``synchronous_commit = on`` (a committed transaction is flushed to the
  server's WAL before COMMIT returns, which an upload's 200 promises, whatever the server's
  default) and a ``lock_timeout`` (a writer waits that long for a row another collector
  holds, then fails instead of hanging);
- a connection is used by one thread at a time; at most ``pool_size`` exist per process; a
  broken one is dropped, never handed out again, and so is an idle one the server closed
  (a restart or failover costs no failed request);
- every write runs in one transaction (:meth:`PgDatabase._write`), committed or rolled back
  as a whole; several reads that must agree run in one ``REPEATABLE READ`` snapshot;
- every statement is parameterised, identifiers (the schema) go through ``sql.Identifier``;
- psycopg errors are translated here: :class:`StorageFullError` for a full disk,
  :class:`StorageError` otherwise, with the SQLSTATE only (server details are logged, not
  sent to clients); ``UniqueViolation`` passes through for callers to judge.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.errors import DiskFull, UniqueViolation
from psycopg.rows import DictRow, dict_row

from sshaudit.collector.problems import StorageError, StorageFullError
from sshaudit.collector.storage_pg_config import PgConfig
from sshaudit.collector.storage_pg_schema import MIGRATIONS

log = logging.getLogger("sshaudit.collector")

Conn = psycopg.Connection[DictRow]
Cursor = psycopg.Cursor[DictRow]
CONNECT_TIMEOUT_S = 10
POOL_WAIT_S = 60.0


def translate(exc: psycopg.Error) -> StorageError:
    if isinstance(exc, DiskFull):
        return StorageFullError("the collector's database is out of disk space")
    log.error("PostgreSQL error: %s", exc)
    return StorageError(f"database error (SQLSTATE {exc.sqlstate or 'none: connection'})")


def utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC)


def utc_req(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


class PgDatabase:
    """A pool of connections to one PostgreSQL schema, migrated to the newest version on open."""

    def __init__(self, config: PgConfig) -> None:
        self.config = config
        self._idle: queue.SimpleQueue[Conn] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(config.pool_size)
        self._lock = threading.Lock()
        self._all: set[Conn] = set()
        try:
            with self._conn() as con:
                _migrate(con, config.schema)
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorageError(f"cannot use the PostgreSQL database: {first}") from exc
        except psycopg.Error as exc:
            raise translate(exc) from exc

    def _connect(self) -> Conn:
        con = psycopg.connect(
            self.config.url,
            autocommit=True,
            row_factory=dict_row,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="sshaudit-collector",
        )
        try:
            con.execute("SET TIME ZONE 'UTC'")
            con.execute("SET synchronous_commit TO on")
            con.execute(
                sql.SQL("SET lock_timeout TO {}").format(
                    sql.Literal(f"{int(self.config.lock_timeout_s * 1000)}ms")
                )
            )
            con.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.config.schema)))
        except BaseException:
            con.close()
            raise
        with self._lock:
            self._all.add(con)
        return con

    def _drop(self, con: Conn) -> None:
        with self._lock:
            self._all.discard(con)
        with contextlib.suppress(psycopg.Error):
            con.close()

    def _take_idle(self) -> Conn | None:
        """An idle pooled connection that still looks alive, or None. An idle connection has
        nothing to read unless the server closed it (a restart, a failover, an idle timeout
        sends a FATAL message, then EOF): such a one is dropped here instead of failing the
        next request."""
        while True:
            try:
                con = self._idle.get_nowait()
            except queue.Empty:
                return None
            try:
                readable = select.select([con.fileno()], [], [], 0)[0]
            except (OSError, ValueError, psycopg.Error):
                readable = [True]
            if not readable and not con.closed and not con.broken:
                return con
            self._drop(con)

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Conn]:
        if not self._slots.acquire(timeout=POOL_WAIT_S):
            raise StorageError("no database connection free (pool exhausted)")
        try:
            con = self._take_idle() or self._connect()
            try:
                yield con
            finally:
                idle = psycopg.pq.TransactionStatus.IDLE
                if con.closed or con.broken or con.info.transaction_status != idle:
                    self._drop(con)
                else:
                    self._idle.put(con)
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Cursor]:
        """A cursor in autocommit mode: each statement sees its own snapshot."""
        try:
            with self._conn() as con, con.cursor() as cur:
                yield cur
        except UniqueViolation:
            raise
        except psycopg.Error as exc:
            raise translate(exc) from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[Cursor]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        try:
            with self._conn() as con, con.transaction(), con.cursor() as cur:
                yield cur
        except UniqueViolation:
            raise
        except psycopg.Error as exc:
            raise translate(exc) from exc

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[Cursor]:
        """Several reads that see one consistent state of the database."""
        with self._write() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield cur

    def _next(self, cur: Cursor, counter: str, n: int = 1) -> int:
        """Reserve ``n`` values of a counter; returns the first. The row stays locked until
        the transaction ends, so values commit in order (storage_pg_schema.py)."""
        cur.execute(
            "UPDATE counters SET value = value + %s WHERE name = %s RETURNING value", (n, counter)
        )
        row = cur.fetchone()
        assert row is not None  # the counters are made by migration 1
        return int(row["value"]) - n + 1

    def close(self) -> None:
        with self._lock:
            cons, self._all = list(self._all), set()
        for con in cons:
            with contextlib.suppress(psycopg.Error):
                con.close()

    def ping(self) -> None:
        with self._read() as cur:
            cur.execute("SELECT 1 FROM policy")
            cur.fetchone()

    def schema_version(self) -> int:
        with self._read() as cur:
            cur.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            row = cur.fetchone()
        return 0 if row is None else int(row["v"])


def _migrate(con: Conn, schema: str) -> None:
    newest = max(v for v, _ in MIGRATIONS)
    for version, statements in MIGRATIONS:
        with con.transaction():
            # Two collectors starting at once: the second waits here, then finds it done.
            con.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (schema,))
            exists = con.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
            if exists.fetchone() is None:
                con.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
            )
            row = con.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            have = _int(row.fetchone())
            if have > newest:
                raise StorageError(
                    f"the database has schema version {have}, newer than this collector knows "
                    f"({newest}): upgrade the collector"
                )
            done = con.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (version,))
            if done.fetchone() is None:
                for statement in statements:
                    con.execute(statement)
                con.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
                    (version, datetime.now(UTC)),
                )


def _int(row: dict[str, Any] | None) -> int:
    return 0 if row is None else int(row["v"])
