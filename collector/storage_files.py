"""Recording blobs as files: ``ROOT/<host_id>/<session_id>.sealed``.

Invariants:
- a path is built only from a host id and a session id that pass collector/ids.py again
  here; each is one path component (no ``/``, no leading ``.``), so no id can reach outside
  ROOT; directories are 0700 and files 0600, opened with ``O_NOFOLLOW`` relative to a
  directory opened with ``O_NOFOLLOW`` too, so a planted symlink is refused, not followed;
- writers hold an exclusive ``flock`` on the file for the whole check-write-commit sequence,
  so two collector processes on one data directory append one after the other;
- :meth:`BlobWriter.write_at` writes at the committed length given by the caller (the
  database), first cutting off any tail a crash left between the write and the commit
  (bytes never acknowledged, never served), then fsyncs: when it returns, the bytes are
  durable; ``ENOSPC``/``EDQUOT`` become :class:`StorageFullError`, other I/O errors
  :class:`StorageError`, and the file is cut back to the committed length.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from sshaudit.collector.ids import is_host_id, is_session_id
from sshaudit.collector.problems import BadRequestError, StorageError, StorageFullError

SUFFIX = ".sealed"
READ_BLOCK = 256 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _os_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in _FULL:
        return StorageFullError(f"the collector's disk is full ({what})")
    return StorageError(f"storage I/O error ({what}): {os.strerror(exc.errno or 0)}")


def _names(host_id: str, session_id: str) -> tuple[str, str]:
    if not is_host_id(host_id) or not is_session_id(session_id):
        raise BadRequestError("invalid host or session id", code="invalid_id")
    return host_id, session_id + SUFFIX


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700 if needed; refuse a symlink or a directory open to others."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o077:
        raise StorageError(f"{path} must be a directory of mode 0700 (not a symlink)")


class BlobWriter:
    """An open, exclusively locked recording file."""

    def __init__(self, fd: int, dir_fd: int, name: str) -> None:
        self._fd, self._dir_fd, self.name = fd, dir_fd, name

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def read(self, start: int, end: int) -> bytes:
        return os.pread(self._fd, end - start, start)

    def write_at(self, committed: int, data: bytes) -> None:
        size = self.size()
        if size < committed:
            raise StorageError(
                f"recording file {self.name} is shorter than its committed length: "
                "the data directory was changed behind the collector's back"
            )
        try:
            if size > committed:
                os.ftruncate(self._fd, committed)  # a crash's unacknowledged tail
            view, pos = memoryview(data), 0
            while pos < len(view):
                pos += os.pwrite(self._fd, view[pos:], committed + pos)
            os.fsync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, committed)
            raise _os_error(exc, f"writing {self.name}") from exc

    def sync_dir(self) -> None:
        """Make a newly created file's directory entry durable (fsync(2) NOTES)."""
        try:
            os.fsync(self._dir_fd)
        except OSError as exc:
            raise _os_error(exc, "syncing a directory") from exc


class FileBlobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        ensure_private_dir(root)

    def _open_dir(self, host_id: str, create: bool) -> int:
        root_fd = os.open(self.root, _DIR_FLAGS)
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(host_id, 0o700, dir_fd=root_fd)
            return os.open(host_id, _DIR_FLAGS, dir_fd=root_fd)
        finally:
            os.close(root_fd)

    @contextlib.contextmanager
    def writer(self, host_id: str, session_id: str, *, create: bool) -> Iterator[BlobWriter]:
        dir_name, name = _names(host_id, session_id)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            dir_fd = self._open_dir(dir_name, create)
        except OSError as exc:
            raise _os_error(exc, f"opening the directory of host {host_id}") from exc
        try:
            try:
                fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
            except OSError as exc:
                raise _os_error(exc, f"opening {name}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield BlobWriter(fd, dir_fd, name)
            finally:
                os.close(fd)  # closing drops the flock
        finally:
            os.close(dir_fd)

    def delete(self, host_id: str, session_id: str) -> None:
        """Unlink a recording file (retention only), without following links; a file
        already gone is not an error. The directory is synced so the unlink is durable."""
        dir_name, name = _names(host_id, session_id)
        try:
            dir_fd = self._open_dir(dir_name, create=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _os_error(exc, f"opening the directory of host {host_id}") from exc
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError as exc:
            raise _os_error(exc, f"deleting {name}") from exc
        finally:
            os.close(dir_fd)

    def read(
        self, host_id: str, session_id: str, start: int, end: int, block: int = READ_BLOCK
    ) -> BlobReader:
        """Bytes ``[start, end)``, in blocks, from a file opened without following links."""
        dir_name, name = _names(host_id, session_id)
        try:
            dir_fd = self._open_dir(dir_name, create=False)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise _os_error(exc, f"opening {name}") from exc
        return BlobReader(fd, name, start, end, block)


class BlobReader:
    """An iterator over a byte range of an open file; the file is opened before the first
    byte is asked for (so a missing file is an error before a response starts) and closed
    at the end, on :meth:`close`, or when the iterator is dropped."""

    def __init__(self, fd: int, name: str, start: int, end: int, block: int) -> None:
        self._fd, self._name, self._pos, self._end, self._block = fd, name, start, end, block

    def __iter__(self) -> BlobReader:
        return self

    def __next__(self) -> bytes:
        if self._pos >= self._end or self._fd < 0:
            self.close()
            raise StopIteration
        try:
            piece = os.pread(self._fd, min(self._block, self._end - self._pos), self._pos)
        except OSError as exc:
            self.close()
            raise _os_error(exc, f"reading {self._name}") from exc
        if not piece:
            self.close()
            raise StorageError(f"recording file {self._name} is shorter than recorded")
        self._pos += len(piece)
        return piece

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        self.close()
