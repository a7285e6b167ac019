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
- botocore errors are translated here (``StorageFullError`` for a full store,
  ``StorageError`` otherwise); messages name the bucket, never credentials.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from sshaudit.collector.ids import is_host_id, is_session_id
from sshaudit.collector.problems import BadRequestError, StorageError, StorageFullError
from sshaudit.collector.storage_pg_config import S3Config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

log = logging.getLogger("sshaudit.collector")

READ_BLOCK = 256 * 1024
_FULL_CODES = {"InsufficientStorage", "QuotaExceeded", "EntityTooLarge"}


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


class S3Blobs:
    """The objects of one bucket (and key prefix)."""

    def __init__(self, config: S3Config) -> None:
        self.bucket, self.prefix = config.bucket, config.prefix
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

    def ping(self) -> None:
        """Raise StorageError unless the bucket answers to these credentials."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, f"bucket {self.bucket!r}") from exc

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
        """Delete objects (retention only), up to 1000 per request (the S3 DeleteObjects
        limit); a key already gone is not an error in S3."""
        for pos in range(0, len(keys), 1000):
            batch: list[ObjectIdentifierTypeDef] = [{"Key": k} for k in keys[pos : pos + 1000]]
            try:
                resp = self._s3.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise _translate(exc, f"deleting {len(batch)} objects") from exc
            errors = resp.get("Errors", [])
            if errors:
                first = errors[0]
                log.error("object store refused to delete %s: %s", first.get("Key"), first)
                raise StorageError(f"object store refused to delete {len(errors)} objects")

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
