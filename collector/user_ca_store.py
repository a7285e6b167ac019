"""The built-in user CA's private key in the collector's state directory, and what
``sshaudit-collector ca init [--rotate]`` does with it.

``DATA/user_ca_key`` holds the one key that signs: Ed25519, OpenSSH private key format,
mode 0600. Its public half is one of the trusted CA keys (``ca add``/``ca list``), which
hosts receive in ``HostConfig.ca_keys`` and write to sshd's TrustedUserCAKeys.

Invariants:
- a key is trusted before it signs: init and rotate add its public key to the storage
  first and only then put the file in place; a crash in between leaves a trusted key that
  never signed (harmless; ``ca remove`` drops it), never a signer hosts do not trust;
- the file appears or is replaced atomically (temporary file, fsync, link or rename,
  directory fsync): a signer reads the old key or the new one, whole;
- ``init`` never overwrites a CA; ``--rotate`` replaces the signer and leaves the old
  public key trusted, so certificates it signed keep working until an admin removes it
  with ``ca remove`` (after they have expired: at most 24 h). The old private key is
  deleted, not kept: a retired CA has to be trusted for a while, never to sign again;
- the key file is read only when it is a regular file (not a symlink) of the collector's
  user with no group or other permission bits; anything else is refused, never used.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_ssh_private_key,
)

from sshaudit.collector import admin
from sshaudit.collector.problems import ConflictError, StorageError
from sshaudit.collector.storage import AuditEvent, CaKey, Storage
from sshaudit.collector.user_ca import public_line

KEY_NAME = "user_ca_key"
NO_CA = "no user CA: run sshaudit-collector ca init"
MAX_KEY_FILE = 16384


@dataclass(frozen=True)
class CaChange:
    key: CaKey  # the new signing key, as trusted
    previous: CaKey | None  # the key it replaced (still trusted), when rotating


def key_path(data: Path) -> Path:
    return data / KEY_NAME


def load_signer(path: Path | None) -> Ed25519PrivateKey:
    """The signing key; ConflictError ``no_user_ca`` when there is none, StorageError
    when the file is unsafe or unreadable (an operator must look at it)."""
    if path is None:
        raise ConflictError(NO_CA, code="no_user_ca")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConflictError(NO_CA, code="no_user_ca") from None
    except OSError as exc:
        raise StorageError(
            f"the user CA key DATA/{path.name}: {exc.strerror}", code="user_ca_error"
        ) from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise StorageError(
                f"the user CA key DATA/{path.name} must be a regular file of this user, mode 0600",
                code="user_ca_error",
            )
        data = f.read(MAX_KEY_FILE + 1)
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise StorageError(
            f"the user CA key DATA/{path.name} is not an unencrypted OpenSSH private key",
            code="user_ca_error",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise StorageError(f"the user CA key DATA/{path.name} is not Ed25519", code="user_ca_error")
    return key


def _key_id(key: Ed25519PrivateKey) -> str:
    """As ``CaKey.key_id``: the hex SHA-256 of the public key blob (admin.parse_ca_line)."""
    blob = base64.b64decode(public_line(key.public_key(), "").split()[1])
    return hashlib.sha256(blob).hexdigest()


def signer_key_id(path: Path) -> str | None:
    """The trusted-key id (``CaKey.key_id``) of the signing key, None without a CA."""
    try:
        return _key_id(load_signer(path))
    except ConflictError:
        return None


def init_ca(storage: Storage, data: Path, now: datetime, *, rotate: bool, actor: str) -> CaChange:
    """Make the user CA (``rotate``: a new signing key beside the old, still trusted)."""
    path = key_path(data)
    previous = _current(storage, path, now)
    if previous is not None and not rotate:
        raise ConflictError(
            f"a user CA exists ({previous.fingerprint}); --rotate makes a new signing key",
            code="user_ca_exists",
        )
    key = Ed25519PrivateKey.generate()
    comment = f"sshaudit-user-ca-{now:%Y%m%d}"
    trusted = admin.add_ca_key(storage, public_line(key.public_key(), comment), now, actor=actor)
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    _install(path, pem, replace=previous is not None)
    detail = {"fingerprint": trusted.fingerprint}
    if previous is not None:
        detail["previous"] = previous.fingerprint
    action = "user_ca_rotated" if previous is not None else "user_ca_created"
    storage.audit(AuditEvent(now, actor, action, trusted.key_id, detail))
    return CaChange(trusted, previous)


def _current(storage: Storage, path: Path, now: datetime) -> CaKey | None:
    """The signing key as trusted, or as it would be (an admin may have removed it)."""
    if not os.path.lexists(path):
        return None
    key = load_signer(path)
    match = [k for k in storage.list_ca_keys() if k.key_id == _key_id(key)]
    return match[0] if match else admin.parse_ca_line(public_line(key.public_key(), ""), now)


def _install(path: Path, data: bytes, *, replace: bool) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # what a crashed run with this pid left
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(tmp, flags, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if another init got there first: never overwrite
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except FileExistsError:
        raise ConflictError(
            "a user CA appeared meanwhile; --rotate makes a new signing key",
            code="user_ca_exists",
        ) from None
    except OSError as exc:
        raise StorageError(f"{path}: {exc.strerror}", code="user_ca_error") from exc
    finally:
        tmp.unlink(missing_ok=True)
