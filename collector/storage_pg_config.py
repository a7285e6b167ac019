"""``DATA/collector.toml``: which storage a collector state directory uses.

Without the file (or with ``backend = "sqlite"``) the state directory holds everything
(SQLite + recording files). With ``backend = "postgresql+s3"`` the metadata lives in
PostgreSQL and the recordings in an S3 bucket, so several collector processes (on several
machines, each with its own state directory for TLS) serve one fleet.

Invariants: the file is parsed strictly (an unknown table or key, a wrong type, a missing
``url`` or ``bucket`` is a :class:`ConfigError` naming it, never ignored); it may hold
secrets (a database password in the URL, an S3 secret key), so it must be a regular file
(not a symlink) owned by the collector's user and not readable by others (0600 or 0400);
secrets never appear in an error message or in ``repr``.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sshaudit.errors import ConfigError

CONFIG_NAME = "collector.toml"
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_PREFIX_RE = re.compile(r"((?!\.\.?/)[A-Za-z0-9._-]+/)*")  # no "." or ".." component
_KINDS: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true/false",
}


class Backend(Enum):
    SQLITE = "sqlite"
    POSTGRESQL_S3 = "postgresql+s3"


class LockMode(Enum):
    """S3 Object Lock retention modes (AWS S3 User Guide, "Object Lock"): COMPLIANCE cannot be
    shortened or lifted by anyone; GOVERNANCE can, by a user with s3:BypassGovernanceRetention."""

    COMPLIANCE = "COMPLIANCE"
    GOVERNANCE = "GOVERNANCE"


@dataclass(frozen=True)
class PgConfig:
    url: str = field(repr=False)  # libpq URL or key=value string; may carry a password
    schema: str = "public"
    pool_size: int = 16  # connections per process, at most
    lock_timeout_s: float = 30.0  # waiting for a recording another collector is appending to


@dataclass(frozen=True)
class S3Config:
    bucket: str
    endpoint: str | None = None  # None: AWS's own endpoint for the region
    region: str = "us-east-1"
    prefix: str = ""  # key prefix inside the bucket, "" or ending with "/"
    access_key_id: str | None = None  # None: boto3's usual chain (environment, instance role)
    secret_access_key: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None  # PEM CA file to verify an https endpoint with
    pool_size: int = 16
    object_lock_days: int | None = None  # None: objects are written without a retention
    object_lock_mode: LockMode = LockMode.COMPLIANCE


@dataclass(frozen=True)
class StorageConfig:
    backend: Backend = Backend.SQLITE
    postgresql: PgConfig | None = None
    s3: S3Config | None = None


def _take(table: dict[str, Any], where: str, key: str, kind: type, default: Any) -> Any:
    value = table.pop(key, default)
    if value is default:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(f"{CONFIG_NAME}: [{where}] {key} must be {_KINDS[kind]}")
    return value


def _required(table: dict[str, Any], where: str, key: str) -> str:
    value = _take(table, where, key, str, None)
    if not value:
        raise ConfigError(f"{CONFIG_NAME}: [{where}] needs {key}")
    return str(value)


def _no_extra(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError(f"{CONFIG_NAME}: [{where}] has unknown keys: {', '.join(sorted(table))}")


def _table(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.pop(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{CONFIG_NAME}: {where}.{key} must be a table")
    return dict(value)


def _pool(table: dict[str, Any], where: str) -> int:
    size = int(_take(table, where, "pool_size", int, 16))
    if not 1 <= size <= 256:
        raise ConfigError(f"{CONFIG_NAME}: [{where}] pool_size must be 1..256")
    return size


def _pg(table: dict[str, Any]) -> PgConfig:
    where = "storage.postgresql"
    url = _required(table, where, "url")
    schema = _take(table, where, "schema", str, "public")
    if not _SCHEMA_RE.fullmatch(schema):
        raise ConfigError(f"{CONFIG_NAME}: [{where}] schema must be a lowercase SQL identifier")
    timeout = float(_take(table, where, "lock_timeout", float, 30.0))
    if not 0 < timeout <= 3600:
        raise ConfigError(f"{CONFIG_NAME}: [{where}] lock_timeout must be 0..3600 seconds")
    out = PgConfig(url, schema, _pool(table, where), timeout)
    _no_extra(table, where)
    return out


def _lock(table: dict[str, Any], where: str) -> tuple[int | None, LockMode]:
    days = _take(table, where, "object_lock_days", int, None)
    mode_name = _take(table, where, "object_lock_mode", str, None)
    if days is None:
        if mode_name is not None:
            raise ConfigError(f"{CONFIG_NAME}: [{where}] object_lock_mode needs object_lock_days")
        return None, LockMode.COMPLIANCE
    if not 1 <= days <= 36500:  # the retention policy's own range (docs/collector.md)
        raise ConfigError(f"{CONFIG_NAME}: [{where}] object_lock_days must be 1..36500")
    try:
        return days, LockMode(mode_name or LockMode.COMPLIANCE.value)
    except ValueError:
        raise ConfigError(
            f"{CONFIG_NAME}: [{where}] object_lock_mode must be COMPLIANCE or GOVERNANCE"
        ) from None


def _s3(table: dict[str, Any]) -> S3Config:
    where = "storage.s3"
    bucket = _required(table, where, "bucket")
    prefix = _take(table, where, "prefix", str, "")
    if not _PREFIX_RE.fullmatch(prefix):
        raise ConfigError(
            f"{CONFIG_NAME}: [{where}] prefix must be empty or path components ending with '/'"
        )
    key_id = _take(table, where, "access_key_id", str, None)
    secret = _take(table, where, "secret_access_key", str, None)
    if (key_id is None) != (secret is None):
        raise ConfigError(
            f"{CONFIG_NAME}: [{where}] access_key_id and secret_access_key go together"
        )
    days, mode = _lock(table, where)
    out = S3Config(
        bucket=bucket,
        endpoint=_take(table, where, "endpoint", str, None),
        region=_take(table, where, "region", str, "us-east-1"),
        prefix=prefix,
        access_key_id=key_id,
        secret_access_key=secret,
        ca_bundle=_take(table, where, "ca_bundle", str, None),
        pool_size=_pool(table, where),
        object_lock_days=days,
        object_lock_mode=mode,
    )
    _no_extra(table, where)
    return out


def parse_config(text: str) -> StorageConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_NAME}: not valid TOML: {exc}") from exc
    storage = _table(doc, "storage", "")
    _no_extra(doc, "top level")
    name = _take(storage, "storage", "backend", str, Backend.SQLITE.value)
    try:
        backend = Backend(name)
    except ValueError:
        choices = ", ".join(b.value for b in Backend)
        raise ConfigError(f"{CONFIG_NAME}: [storage] backend must be one of {choices}") from None
    pg, s3 = _table(storage, "postgresql", "storage"), _table(storage, "s3", "storage")
    _no_extra(storage, "storage")
    if backend is Backend.SQLITE:
        if pg or s3:
            raise ConfigError(f"{CONFIG_NAME}: [storage.postgresql]/[storage.s3] need a backend")
        return StorageConfig()
    return StorageConfig(backend, _pg(pg), _s3(s3))


def load_config(data_dir: Path) -> StorageConfig:
    """The state directory's storage configuration (the embedded default without a file)."""
    path = data_dir / CONFIG_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return StorageConfig()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror} (a symlink is refused)") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError(
                f"{path}: must be owned by the collector's user and mode 0600 "
                "(it may hold passwords)"
            )
        raw = f.read(1 << 20)
    try:
        return parse_config(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8") from exc


def has_config(data_dir: Path) -> bool:
    return (data_dir / CONFIG_NAME).is_file()
