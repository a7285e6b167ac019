"""Recording bytes in an S3-compatible object store (boto3), one object per acknowledged append.

S3 has no append, so a recording is a list of parts: the prefix, then each chunk an upload
added, each stored once as its own object and never rewritten. The database (storage_pg.py)
holds the committed length and the list of parts with their SHA-256; this module only
writes and reads objects.

Invariants:
- a key is ``<prefix><host_id>/<session_id>/<offset:020d>.<16 random hex>``, built only from
  ids that pass collector/ids.py again here; the random suffix makes every write attempt
  its own object, so a write that arrives late (its collector lost the database row lock,
  another one committed that offset since) can never replace committed bytes: it lands
  beside them, unreferenced, and is never served;
- :meth:`S3Blobs.put` returns only once the store acknowledged the whole object (S3's PUT is
  atomic and durable when it answers 200); the body carries ``Content-MD5`` so the store
  refuses bytes damaged in transit;
- every object read is checked against the length and SHA-256 the database recorded for it:
  an object altered, swapped or cut in the store is a :class:`StorageError`, never served;
- objects are deleted only by retention (:meth:`S3Blobs.delete`), after the database
  commit that forgot them;
- with ``object_lock_days`` set, every object is written with an Object Lock retention
  (mode + retain-until = the injected clock's now + N days) and the store is asked, when
  :class:`S3Blobs` is made, whether the bucket has Object Lock enabled: a bucket without it
  is a :class:`ConfigError`, so no object is ever written unprotected by mistake. Since a
  locked bucket is versioned, a DELETE without a version id only adds a delete marker and
  the bytes stay: retention then deletes each version by id, which the store refuses while
  the version is locked (that refusal is a :class:`StorageError` the caller logs);
- botocore errors are translated here (``StorageFullError`` for a full store,
  ``StorageError`` otherwise); messages name the bucket, never credentials.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from sshaudit.collector.ids import is_host_id, is_session_id
from sshaudit.collector.problems import BadRequestError, StorageError, StorageFullError
from sshaudit.collector.storage_pg_config import S3Config
from sshaudit.errors import ConfigError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

log = logging.getLogger("sshaudit.collector")

READ_BLOCK = 256 * 1024
_FULL_CODES = {"InsufficientStorage", "QuotaExceeded", "EntityTooLarge"}
_NO_LOCK_CODES = {"ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"}


@dataclass(frozen=True)
class Part:
    """One stored object: bytes ``[offset, offset + length)`` of a recording."""

    offset: int
    length: int
    key: str
    sha256: bytes


def _translate(exc: Exception, what: str) -> StorageError:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        log.error("object store error (%s): %s %s", what, code, err.get("Message", ""))
        if code in _FULL_CODES or status == 507:
            return StorageFullError(f"the object store is full ({what})")
        return StorageError(f"object store error ({what}): {code or status}")
    log.error("object store unreachable (%s): %s", what, exc)
    return StorageError(f"object store unreachable ({what}): {type(exc).__name__}")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def lock_params(config: S3Config, now: datetime) -> dict[str, Any]:
    """The ``put_object`` parameters that give a new object its Object Lock retention
    (S3 API PutObject: ``x-amz-object-lock-mode``, ``x-amz-object-lock-retain-until-date``);
    empty when the configuration asks for no lock. ``now`` must be timezone-aware: the
    date is an absolute instant and the store compares it with its own UTC clock."""
    if config.object_lock_days is None:
        return {}
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("lock_params needs a timezone-aware time")
    return {
        "ObjectLockMode": config.object_lock_mode.value,
        "ObjectLockRetainUntilDate": now.astimezone(UTC) + timedelta(days=config.object_lock_days),
    }


class S3Blobs:
    """The objects of one bucket (and key prefix)."""

    def __init__(self, config: S3Config, clock: Callable[[], datetime] = _utc_now) -> None:
        self.bucket, self.prefix = config.bucket, config.prefix
        self._config, self._clock = config, clock
        client_config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if config.endpoint else "auto"},
            retries={"max_attempts": 4, "mode": "standard"},
            max_pool_connections=config.pool_size,
            connect_timeout=10,
            read_timeout=60,
        )
        session = boto3.session.Session()
        self._s3: S3Client = session.client(
            "s3",
            endpoint_url=config.endpoint,
            region_name=config.region,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            verify=config.ca_bundle if config.ca_bundle else True,
            config=client_config,
        )
        self.ping()
        if config.object_lock_days is not None:
            self.check_lock()

    def ping(self) -> None:
        """Raise StorageError unless the bucket answers to these credentials."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, f"bucket {self.bucket!r}") from exc

    def check_lock(self) -> None:
        """Raise ConfigError unless the bucket has Object Lock enabled: S3 can only turn
        it on for a bucket (and so its versioning), and per-object retention is refused or,
        worse, silently absent on a bucket without it."""
        try:
            resp = self._s3.get_object_lock_configuration(Bucket=self.bucket)
            enabled = resp.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) not in _NO_LOCK_CODES:
                raise _translate(exc, f"object lock of bucket {self.bucket!r}") from exc
            enabled = None
        except BotoCoreError as exc:
            raise _translate(exc, f"object lock of bucket {self.bucket!r}") from exc
        if enabled != "Enabled":
            raise ConfigError(
                f"collector.toml: [storage.s3] object_lock_days is set but bucket "
                f"{self.bucket!r} does not have S3 Object Lock enabled (it can only be enabled "
                "on the bucket, e.g. when it is created); remove object_lock_days or use a "
                "bucket with Object Lock"
            )

    def new_key(self, host_id: str, session_id: str, offset: int) -> str:
        if not is_host_id(host_id) or not is_session_id(session_id) or offset < 0:
            raise BadRequestError("invalid host or session id", code="invalid_id")
        return f"{self.prefix}{host_id}/{session_id}/{offset:020d}.{secrets.token_hex(8)}"

    def put(self, key: str, data: bytes) -> None:
        md5 = hashlib.md5(data, usedforsecurity=False).digest()  # RFC 1864 transit check
        try:
            self._s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentLength=len(data),
                ContentMD5=base64.b64encode(md5).decode(),
                ContentType="application/octet-stream",
                **lock_params(self._config, self._clock()),
            )
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, f"writing {key}") from exc

    def get(self, part: Part) -> bytes:
        """The whole object of ``part``, checked against its recorded length and digest."""
        try:
            resp = self._s3.get_object(Bucket=self.bucket, Key=part.key)
            data = resp["Body"].read(part.length + 1)
            resp["Body"].close()
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, f"reading {part.key}") from exc
        digest = hashlib.sha256(data).digest()
        if len(data) != part.length or not hmac.compare_digest(digest, part.sha256):
            log.error("object %s does not match its recorded length and SHA-256", part.key)
            raise StorageError(
                f"recording object {part.key} was changed in the object store: not served"
            )
        return data

    def delete(self, keys: Sequence[str]) -> None:
        """Delete objects (retention only). A key already gone is not an error in S3. With
        Object Lock every version of each key is deleted by id (a versionless DELETE would
        only hide the bytes behind a delete marker); a version still locked is refused by
        the store, and that refusal is a StorageError after every other object went."""
        objects: list[ObjectIdentifierTypeDef] = (
            [{"Key": k} for k in keys]
            if self._config.object_lock_days is None
            else self._versions(keys)
        )
        refused = 0
        for pos in range(0, len(objects), 1000):  # the S3 DeleteObjects limit per request
            refused += self._delete_batch(objects[pos : pos + 1000])
        if refused:
            raise StorageError(f"object store refused to delete {refused} objects")

    def _delete_batch(self, batch: list[ObjectIdentifierTypeDef]) -> int:
        try:
            resp = self._s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, f"deleting {len(batch)} objects") from exc
        errors = resp.get("Errors", [])
        for err in errors[:5]:  # enough to see why (AccessDenied: a lock), not a flood
            log.error(
                "object store refused to delete %s (version %s): %s %s",
                err.get("Key"),
                err.get("VersionId", "-"),
                err.get("Code"),
                err.get("Message", ""),
            )
        return len(errors)

    def _versions(self, keys: Sequence[str]) -> list[ObjectIdentifierTypeDef]:
        """Every version and delete marker of ``keys``, listed once per session folder
        (all parts of a recording share ``<prefix><host_id>/<session_id>/``)."""
        wanted = set(keys)
        out: list[ObjectIdentifierTypeDef] = []
        for folder in sorted({k.rpartition("/")[0] + "/" for k in wanted}):
            pages = self._s3.get_paginator("list_object_versions")
            try:
                for page in pages.paginate(Bucket=self.bucket, Prefix=folder):
                    for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                        if v.get("Key") in wanted and "VersionId" in v:
                            out.append({"Key": v["Key"], "VersionId": v["VersionId"]})
            except (ClientError, BotoCoreError) as exc:
                raise _translate(exc, f"listing versions under {folder}") from exc
        return out

    def read(self, parts: Sequence[Part], start: int, end: int) -> PartsReader:
        return PartsReader(self, parts, start, end)


class PartsReader:
    """Bytes ``[start, end)`` of a recording from its parts, in order. The first part is
    fetched (and checked) when the reader is made, so a missing or altered object is an
    error before a response starts."""

    def __init__(self, blobs: S3Blobs, parts: Sequence[Part], start: int, end: int) -> None:
        self._pieces = self._slices(blobs, parts, start, end)
        self._first = next(self._pieces, b"") if start < end else b""

    @staticmethod
    def _slices(blobs: S3Blobs, parts: Sequence[Part], start: int, end: int) -> Iterator[bytes]:
        for part in parts:
            data = blobs.get(part)
            lo, hi = max(start, part.offset), min(end, part.offset + part.length)
            view = memoryview(data)[lo - part.offset : hi - part.offset]
            for pos in range(0, len(view), READ_BLOCK):
                yield bytes(view[pos : pos + READ_BLOCK])

    def __iter__(self) -> Iterator[bytes]:
        if self._first:
            yield self._first
        yield from self._pieces
