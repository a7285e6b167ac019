"""The file transaction of enroll/unenroll: backups first, atomic writes, exact restore.

Invariants:
- The backup manifest (``<backup_dir>/manifest.json``, directory 0700, copies 0600) is written
  and fsynced *before* any target file changes, so a crash at any point leaves enough on disk
  for ``restore_all`` to put every file back.
- The manifest keeps the *original* (pre-enroll) state of each path for good: a re-enroll adds
  paths it has not seen and updates only the SHA-256 of what we wrote, never the backup.
- Each target is replaced atomically: temporary file in the same directory, fsync, os.replace,
  fsync of the directory. Readers (sshd, PAM) see the old or the new file, never a mix.
- ``restore_all`` puts back bytes, mode, uid and gid exactly (and removes files that did not
  exist), verified against the original SHA-256; it refuses, listing them, when a file is
  neither what we wrote nor the original (edited since), unless ``force=True``.
- Only regular files are touched: a symlink or directory at a target path is refused.
- Texts are encoded UTF-8 with ``surrogateescape`` (:func:`read_text` decodes the same way),
  so a file with any bytes round-trips exactly through the pure edit functions.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sshaudit.errors import ConfigError

from .sshd_parse import lines_keepends

MANIFEST = "manifest.json"
_ORIGINALS = "originals"
_ENCODING = ("utf-8", "surrogateescape")

Writer = Callable[[Path, bytes, int, int, int], None]
"""(path, data, mode, uid, gid): writes one file atomically; tests pass a failing one."""


@dataclass(frozen=True)
class FileChange:
    """Make ``path`` hold ``new_text`` with ``mode`` (None: delete it). An existing file keeps
    its owner; a new one belongs to the effective uid/gid."""

    path: Path
    new_text: str | None
    mode: int = 0o644


@dataclass(frozen=True)
class Snapshot:
    """One path's state: ``data`` None when absent."""

    path: Path
    data: bytes | None
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Applied:
    """What :func:`apply` did, enough for :func:`rollback`."""

    backup_dir: Path
    changes: tuple[FileChange, ...]
    before: tuple[Snapshot, ...]
    manifest_before: bytes | None
    new_backups: tuple[Path, ...]
    # Paths already in the manifest whose content was neither what we last wrote nor the
    # original (an admin edited them between two enrolls): unenroll restores the pre-enroll
    # original and would drop that edit, so enroll should tell the admin.
    edited_since: tuple[Path, ...] = ()


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _encode(text: str | None) -> bytes | None:
    return None if text is None else text.encode(*_ENCODING)


def read_text(path: Path) -> str | None:
    """A file's text (``surrogateescape``-decoded), None when it does not exist."""
    try:
        return path.read_bytes().decode(*_ENCODING)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def _snapshot(path: Path) -> Snapshot:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return Snapshot(path, None, 0, os.geteuid(), os.getegid())
    except OSError as exc:
        raise ConfigError(f"cannot inspect {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(
            f"{path} is not a regular file (symlink?); sshaudit edits regular files only"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return Snapshot(path, data, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Replace ``path`` by ``data`` atomically (see the module docstring)."""
    temp = path.with_name(f".{path.name}.sshaudit-{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, 0o600)
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)
            info = os.fstat(fd)
            if (info.st_uid, info.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot remove {path}: {exc.strerror}") from exc
    _fsync_dir(path.parent)


def _put(snapshot: Snapshot, writer: Writer) -> None:
    if snapshot.data is None:
        _remove(snapshot.path)
    else:
        writer(snapshot.path, snapshot.data, snapshot.mode, snapshot.uid, snapshot.gid)


def _load_manifest(backup_dir: Path) -> tuple[bytes | None, dict[str, dict[str, Any]]]:
    path = backup_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        document = json.loads(raw)
        entries = {entry["path"]: entry for entry in document["files"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not an sshaudit backup manifest") from exc
    return raw, entries


def _manifest_bytes(entries: dict[str, dict[str, Any]]) -> bytes:
    document = {"version": 1, "files": list(entries.values())}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def _prepare_backup_dir(backup_dir: Path) -> None:
    try:
        backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if backup_dir.is_symlink() or not backup_dir.is_dir():
            raise ConfigError(f"{backup_dir}: not a directory")
        backup_dir.chmod(0o700)
        (backup_dir / _ORIGINALS).mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot prepare {backup_dir}: {exc.strerror}") from exc


def _validate(changes: Sequence[FileChange]) -> None:
    seen: set[Path] = set()
    for change in changes:
        if not change.path.is_absolute():
            raise ConfigError(f"{change.path}: not an absolute path")
        if change.path in seen:
            raise ConfigError(f"{change.path}: changed twice in one transaction")
        seen.add(change.path)
        if not change.path.parent.is_dir():
            raise ConfigError(f"{change.path.parent}: no such directory")
        if not 0 <= change.mode <= 0o7777:
            raise ConfigError(f"{change.path}: bad mode {change.mode:o}")


def apply(
    changes: Iterable[FileChange], backup_dir: Path, writer: Writer = write_atomic
) -> Applied:
    """Back up, then make every change; on any failure undo what was done and raise."""
    todo = tuple(changes)
    _validate(todo)
    before = tuple(_snapshot(change.path) for change in todo)
    _prepare_backup_dir(backup_dir)
    manifest_before, entries = _load_manifest(backup_dir)
    new_backups: list[Path] = []
    edited = tuple(
        snap.path
        for snap in before
        if str(snap.path) in entries
        and _sha256(snap.data)
        not in (
            entries[str(snap.path)]["written_sha256"],
            entries[str(snap.path)]["original_sha256"],
        )
    )
    applied = Applied(backup_dir, todo, before, manifest_before, (), edited)
    try:
        for change, snap in zip(todo, before, strict=True):
            key = str(change.path)
            if key not in entries:
                entries[key] = _original_entry(snap, backup_dir, new_backups, writer)
            entries[key]["written_sha256"] = _sha256(_encode(change.new_text))
        writer(backup_dir / MANIFEST, _manifest_bytes(entries), 0o600, os.geteuid(), os.getegid())
        applied = replace(applied, new_backups=tuple(new_backups))
        for change, snap in zip(todo, before, strict=True):
            data = _encode(change.new_text)
            _put(Snapshot(change.path, data, change.mode, snap.uid, snap.gid), writer)
    except BaseException:
        rollback(replace(applied, new_backups=tuple(new_backups)))
        raise
    return applied


def _original_entry(
    snap: Snapshot, backup_dir: Path, new_backups: list[Path], writer: Writer
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": str(snap.path),
        "original_sha256": _sha256(snap.data),
        "mode": snap.mode,
        "uid": snap.uid,
        "gid": snap.gid,
        "backup": None,
    }
    if snap.data is not None:
        name = f"{_ORIGINALS}/{hashlib.sha256(str(snap.path).encode()).hexdigest()}"
        writer(backup_dir / name, snap.data, 0o600, os.geteuid(), os.getegid())
        new_backups.append(backup_dir / name)
        entry["backup"] = name
    return entry


def rollback(applied: Applied) -> None:
    """Put every file of ``applied`` back as it was just before :func:`apply` (and the
    manifest too). Safe on a partly applied transaction."""
    for snap in applied.before:
        _put(snap, write_atomic)
    manifest = applied.backup_dir / MANIFEST
    if applied.manifest_before is None:
        _remove(manifest)
    else:
        write_atomic(manifest, applied.manifest_before, 0o600, os.geteuid(), os.getegid())
    for backup in applied.new_backups:
        _remove(backup)


def _current_sha(path: Path) -> str | None:
    return _sha256(_snapshot(path).data)


def restore_all(backup_dir: Path, force: bool = False) -> list[Path]:
    """Restore every path in the manifest to its pre-enroll state, then drop the manifest.

    Returns the paths restored; an empty list when nothing was ever enrolled.
    """
    _, entries = _load_manifest(backup_dir)
    edited = [
        path
        for path, entry in entries.items()
        if _current_sha(Path(path)) not in (entry["written_sha256"], entry["original_sha256"])
    ]
    if edited and not force:
        raise ConfigError(
            "changed since sshaudit wrote them (restore would lose those edits; re-run with "
            "--force to restore the originals anyway): " + ", ".join(sorted(edited))
        )
    originals: list[Snapshot] = []
    for path, entry in entries.items():  # verify every backup before touching any file
        data = None
        if entry["backup"] is not None:
            data = _snapshot(backup_dir / entry["backup"]).data
            if _sha256(data) != entry["original_sha256"]:
                raise ConfigError(f"backup of {path} in {backup_dir} is damaged; not restoring")
        originals.append(Snapshot(Path(path), data, entry["mode"], entry["uid"], entry["gid"]))
    for snap in originals:
        _put(snap, write_atomic)
    for entry in entries.values():
        if entry["backup"] is not None:
            _remove(backup_dir / entry["backup"])
    _remove(backup_dir / MANIFEST)
    return [snap.path for snap in originals]


def _diff_lines(text: str) -> list[str]:
    lines = lines_keepends(text)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines


def unified_diff(changes: Iterable[FileChange]) -> str:
    """What :func:`apply` would change, as a unified diff (for ``--dry-run``)."""
    out: list[str] = []
    for change in changes:
        label = str(change.path).lstrip("/")
        old = read_text(change.path) or ""
        out.extend(
            difflib.unified_diff(
                _diff_lines(old),
                _diff_lines(change.new_text or ""),
                fromfile=f"a/{label}",
                tofile=f"b/{label}",
            )
        )
    return "".join(out)
