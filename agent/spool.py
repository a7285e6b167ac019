"""The root-only spool: sealed recordings and their metadata, with fsync and a size cap.

Layout of ``spool_dir`` (0700, owned by the daemon's user, root):
- ``<session_id>.sealed``: the sealed recording (FORMAT.md), frames appended as they are cut,
  each batch written with ``os.write`` and made durable with ``os.fsync`` before the daemon
  goes on (so a frame the recorder saw acknowledged survives a crash);
- ``<session_id>.json``: the session record (DESIGN.md "Session record fields") plus the
  spool state under ``spool``; replaced atomically (temporary file, fsync, ``os.replace``,
  fsync of the directory), so a reader sees the old or the new record, never half of one;
- ``pam-queue.jsonl``: PAM events the hook could not hand to the daemon (it was down);
  the daemon takes them over at start and every few seconds while it runs (see
  :meth:`Spool.take_pam_queue`).

Invariants: the daemon refuses a spool directory that is a symlink, not owned by it, or open
to group or others; every file is created 0600 with ``O_NOFOLLOW`` (and ``O_EXCL`` for
recordings), so nothing the recorded user controls is followed or reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from sshaudit.agent.config import OnSpoolFull
from sshaudit.errors import ConfigError, SealedFormatError
from sshaudit.pam_module.hook import PAM_QUEUE_NAME
from sshaudit.sealed import MAGIC, MAX_HEADER, TRAILER_MARK, parse_header, rfc3339

SEALED_SUFFIX = ".sealed"
RECORD_SUFFIX = ".json"
MAX_RECORD_BYTES = 4 << 20
MAX_QUEUE_BYTES = 16 << 20
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_U32 = struct.Struct(">I")


class RecordingStatus(Enum):
    """DESIGN.md ``recording_status``."""

    RECORDING = "recording"
    COMPLETE = "complete"
    TRUNCATED = "truncated"
    UNRECORDED = "unrecorded"
    RECORDER_LOST = "recorder_lost"


class SpoolState(Enum):
    """Where the recording file stands in the spool."""

    WRITING = "writing"  # the daemon is appending frames
    CLOSED = "closed"  # finished (complete or not), waiting to be shipped
    DROPPED = "dropped"  # removed by on_spool_full = "drop_oldest"; the record stays
    NONE = "none"  # there never was a recording (unrecorded)


@dataclass(frozen=True)
class SessionRecord:
    """One session's record: the DESIGN.md fields, then the spool's own."""

    session_id: str
    user_email: str = ""
    unix_user: str = ""
    target_id: str = ""
    hostname: str = ""
    client_address: str = ""
    client_port: int | None = None
    server_address: str = ""
    server_port: int | None = None
    session_start: str = ""
    session_finish: str | None = None
    program_type: str | None = None
    command: str | None = None
    exit_status: int | None = None
    error: str | None = None
    recording_status: RecordingStatus = RecordingStatus.RECORDING
    bytes_in: int = 0
    bytes_out: int = 0
    cert_serial: int | None = None
    cert_fingerprint: str = ""
    principal: str = ""
    spool_state: SpoolState = SpoolState.WRITING
    frames: int = 0
    sealed_bytes: int = 0
    priv_pid: int | None = None
    details: dict[str, Any] = field(default_factory=dict)  # more than the DESIGN fields

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        spool = {k: doc.pop(k) for k in ("frames", "sealed_bytes", "priv_pid")}
        spool["state"] = self.spool_state.value
        spool["file"] = None if self.spool_state is SpoolState.NONE else self.sealed_name
        del doc["spool_state"]
        doc["recording_status"] = self.recording_status.value
        doc["spool"] = spool
        return doc

    @property
    def sealed_name(self) -> str:
        return self.session_id + SEALED_SUFFIX

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SessionRecord:
        try:
            spool = doc["spool"]
            known = cls.__dataclass_fields__
            fields = {k: v for k, v in doc.items() if k in known}  # newer fields: ignored
            fields["recording_status"] = RecordingStatus(doc["recording_status"])
            fields["spool_state"] = SpoolState(spool["state"])
            for name in ("frames", "sealed_bytes", "priv_pid"):
                fields[name] = spool.get(name, cls.__dataclass_fields__[name].default)
            if not isinstance(fields.get("details"), dict):
                fields["details"] = {}
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise SealedFormatError(f"not a session record: {exc}") from exc


def _check_dir(path: Path, uid: int) -> None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"spool_dir {path}: not a directory (a symlink is refused)")
    if st.st_uid != uid:
        raise ConfigError(f"spool_dir {path}: owned by uid {st.st_uid}, must be uid {uid}")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"spool_dir {path}: mode {stat.S_IMODE(st.st_mode):04o}, must be 0700 "
            "(no access for group or others)"
        )


def prepare_spool_dir(path: Path, uid: int | None = None) -> None:
    """Create ``path`` 0700, or check an existing one (owner ``uid``, no group/other bits)."""
    uid = os.geteuid() if uid is None else uid
    try:
        if not path.exists() and not path.is_symlink():
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700)
        _check_dir(path, uid)
    except OSError as exc:
        raise ConfigError(f"spool_dir {path}: {exc.strerror}") from exc


class SpoolFile:
    """A recording being written: append-only, every append fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, _OPEN_NEW, 0o600)

    def append(self, data: bytes) -> None:
        if self._fd is None:
            raise ValueError("spool file closed")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class SealedScan:
    """What a sealed file holds, read without a key: frames, trailer, bytes."""

    frames: int
    size: int
    trailer: bool
    torn: bool


def scan_sealed(path: Path) -> SealedScan:
    """Walk the length prefixes of a sealed file (no decryption)."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            return SealedScan(0, size, trailer=False, torn=True)
        pos = len(head) + _U32.unpack_from(head, len(MAGIC))[0]
        frames = 0
        while pos + 4 <= size:
            f.seek(pos)
            (n,) = _U32.unpack(f.read(4))
            if n == TRAILER_MARK:
                return SealedScan(frames, size, trailer=True, torn=False)
            if pos + 4 + n > size:
                return SealedScan(frames, size, trailer=False, torn=True)
            frames += 1
            pos += 4 + n
        return SealedScan(frames, size, trailer=False, torn=pos != size)


def _read_sealed_header(path: Path) -> tuple[str, str]:
    """The session id and created_at from a sealed file's header (no key needed)."""
    with path.open("rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise SealedFormatError(f"{path.name}: not a sealed recording")
        (n,) = _U32.unpack_from(head, len(MAGIC))
        if n > MAX_HEADER:
            raise SealedFormatError(f"{path.name}: header too large")
        header = parse_header(f.read(n))
    return header.session_id, header.created_at


class Spool:
    """The spool directory of a running daemon."""

    def __init__(
        self, directory: Path, *, max_bytes: int, on_full: OnSpoolFull, uid: int | None = None
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.on_full = on_full
        self._uid = os.geteuid() if uid is None else uid

    def prepare(self) -> None:
        """Create or check the directory; remove temporary files a crash left behind."""
        prepare_spool_dir(self.directory, self._uid)
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    Path(entry.path).unlink()

    def path(self, name: str) -> Path:
        return self.directory / name

    def create_recording(self, session_id: str) -> SpoolFile:
        return SpoolFile(self.path(session_id + SEALED_SUFFIX))

    def write_record(self, record: SessionRecord) -> None:
        data = json.dumps(record.to_json(), ensure_ascii=False, indent=1).encode() + b"\n"
        tmp = self.path(f".{record.session_id}.json.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path(record.session_id + RECORD_SUFFIX))
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_record(self, session_id: str) -> SessionRecord:
        return read_record(self.path(session_id + RECORD_SUFFIX))

    def records(self) -> Iterator[SessionRecord]:
        yield from iter_records(self.directory)

    def usage(self) -> int:
        total = 0
        for entry in os.scandir(self.directory):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def make_room(self, uid: int | None = None, need: int = 0) -> tuple[bool, list[str]]:
        """Is there room for ``need`` more bytes (a new recording: 0)? With ``drop_oldest``,
        first remove finished recordings, oldest first, until there is: those the collector
        already holds whole, then ``uid``'s own. Another user's unshipped recording is never
        removed, so nobody can erase someone else's evidence by filling the spool (issue 9).
        Dropped recordings keep their record, marked ``dropped``. Returns whether there is
        room now, and the session ids dropped."""
        used = self.usage()
        if used + need < self.max_bytes:
            return True, []
        if self.on_full is OnSpoolFull.REFUSE:
            return False, []
        dropped: list[str] = []
        for record, size, _ in self._droppable(uid):
            if used + need < self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                self.path(record.sealed_name).unlink()
                used -= size
            self.write_record(replace(record, spool_state=SpoolState.DROPPED))
            dropped.append(record.session_id)
        return used + need < self.max_bytes, dropped

    def _droppable(self, uid: int | None) -> list[tuple[SessionRecord, int, bool]]:
        """Finished recordings ``drop_oldest`` may remove, in the order it removes them:
        those shipped whole first (nothing is lost), then ``uid``'s own, oldest first."""
        out = []
        for record in self.records():
            if record.spool_state is not SpoolState.CLOSED:
                continue
            try:
                size = self.path(record.sealed_name).stat().st_size
            except FileNotFoundError:
                continue
            shipped = self._collector_holds(record.session_id, size)
            if shipped or (uid is not None and record.details.get("uid") == uid):
                out.append((record, size, shipped))
        return sorted(out, key=lambda c: (not c[2], c[0].session_start, c[0].session_id))

    def _collector_holds(self, session_id: str, size: int) -> bool:
        """The shipper's sidecar says the collector holds every byte of the file durably."""
        # imported here: ship_files imports the shipper, which imports this module
        from sshaudit.agent.ship_files import read_ship_state

        state = read_ship_state(self.directory, session_id)
        return state is not None and state.acked >= size

    def recover(self, now: datetime) -> list[SessionRecord]:
        """After a daemon restart: every recording left ``writing`` is closed as truncated
        (its file has no last frame: FORMAT.md), with the time of its last frame."""
        changed: list[SessionRecord] = []
        known = set()
        for record in list(self.records()):
            known.add(record.session_id)
            if record.spool_state is SpoolState.WRITING:
                changed.append(self._close_orphan(record, now))
        for entry in os.scandir(self.directory):
            sid = entry.name.removesuffix(SEALED_SUFFIX)
            if entry.name.endswith(SEALED_SUFFIX) and sid not in known:
                changed.append(self._adopt_sealed(Path(entry.path), now))
        return changed

    def _close_orphan(self, record: SessionRecord, now: datetime) -> SessionRecord:
        sealed = self.path(record.sealed_name)
        try:
            scan = scan_sealed(sealed)
            finish = rfc3339(datetime.fromtimestamp(sealed.stat().st_mtime, UTC))
        except OSError:
            scan, finish = SealedScan(0, 0, trailer=False, torn=False), rfc3339(now)
        status = record.recording_status
        if status is RecordingStatus.RECORDING:
            status = RecordingStatus.TRUNCATED
        fixed = replace(
            record,
            recording_status=status,
            session_finish=record.session_finish or finish,
            error=record.error or "the agent daemon stopped during the session",
            spool_state=SpoolState.CLOSED,
            frames=scan.frames,
            sealed_bytes=scan.size,
        )
        self.write_record(fixed)
        return fixed

    def _adopt_sealed(self, path: Path, now: datetime) -> SessionRecord:
        session_id = path.name.removesuffix(SEALED_SUFFIX)
        error = "the agent daemon stopped before the session record was written"
        try:
            header_id, created = _read_sealed_header(path)
            if header_id != session_id:
                error += f" (the file's header names session {header_id})"
        except (OSError, SealedFormatError):
            created = ""
            error += " (the file has no readable header)"
        record = SessionRecord(
            session_id=session_id,
            session_start=created,
            recording_status=RecordingStatus.TRUNCATED,
            error=error,
        )
        return self._close_orphan(record, now)

    def take_pam_queue(self) -> list[dict[str, Any]]:
        """The PAM events the hook queued while the daemon was down, oldest first; the
        queue file is removed once read (renamed first, so the hook's appends during the
        read start a new queue)."""
        queue = self.path(PAM_QUEUE_NAME)
        taking = self.path(PAM_QUEUE_NAME + ".taking")
        events: list[dict[str, Any]] = []
        with contextlib.suppress(FileNotFoundError):
            queue.rename(taking)
        try:
            fd = os.open(taking, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return events
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_QUEUE_BYTES)
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    events.append(doc)
        taking.unlink()
        self._fsync_dir()
        return events


def read_record(path: Path) -> SessionRecord:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise SealedFormatError(f"{path.name}: session record too large")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise SealedFormatError(f"{path.name}: not JSON") from exc
    if not isinstance(doc, dict):
        raise SealedFormatError(f"{path.name}: not a JSON object")
    return SessionRecord.from_json(doc)


def iter_records(directory: Path) -> Iterator[SessionRecord]:
    """Every readable session record in the spool (unreadable ones are skipped)."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.endswith(RECORD_SUFFIX) and not entry.name.startswith("."):
            with contextlib.suppress(OSError, SealedFormatError):
                yield read_record(Path(entry.path))


@dataclass(frozen=True)
class SpoolEntry:
    """One line of ``sshaudit-agent spool list``."""

    session_id: str
    unix_user: str
    session_start: str
    recording_status: str
    spool_state: str
    frames: int
    bytes: int
    closed_file: bool  # the file ends with its signature trailer (sealed to the end)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def list_spool(directory: Path) -> list[SpoolEntry]:
    """What the spool holds, oldest first: each record with its recording file scanned."""
    entries: list[SpoolEntry] = []
    for record in iter_records(directory):
        sealed = directory / record.sealed_name
        try:
            scan = scan_sealed(sealed)
        except OSError:
            scan = SealedScan(0, 0, trailer=False, torn=False)
        entries.append(
            SpoolEntry(
                session_id=record.session_id,
                unix_user=record.unix_user,
                session_start=record.session_start,
                recording_status=record.recording_status.value,
                spool_state=record.spool_state.value,
                frames=scan.frames,
                bytes=scan.size,
                closed_file=scan.trailer,
            )
        )
    return sorted(entries, key=lambda e: (e.session_start, e.session_id))
