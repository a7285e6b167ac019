"""The shipper's files in the spool (agent/spool.py describes the rest of it): the
``<id>.ship`` sidecars, the queued authentication events, and careful reads of the sealed
files the daemon is still appending to.

Invariants: every file is opened with ``O_NOFOLLOW`` and read with a size bound; every write
replaces a file atomically (temporary file, fsync, rename, fsync of the directory), so a
crash leaves the old or the new file, never half of one; temporary files are named
``.<name>.tmp``, which ``Spool.prepare`` removes after a crash.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sshaudit.agent.shipper import ShipState
from sshaudit.sealed import MAGIC, MAX_HEADER

SHIP_SUFFIX = ".ship"
EVENTS_PREFIX, EVENTS_SUFFIX, REJECTED_SUFFIX = "auth-events-", ".events", ".rejected"
MAX_EVENTS = 1000  # per POST /v1/auth-events (docs/collector.md)
MAX_SIDE_FILE = 4 << 20
_PREFIX_HEAD = len(MAGIC) + 4


def open_read(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def pread_all(fd: int, size: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while size > 0:
        data = os.pread(fd, size, offset)
        if not data:
            break
        parts.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(parts)


def read_small(path: Path) -> bytes:
    fd = open_read(path)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_SIDE_FILE + 1)
    if len(data) > MAX_SIDE_FILE:
        raise ValueError(f"{path.name}: larger than {MAX_SIDE_FILE} bytes")
    return data


def write_atomic(directory: Path, name: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``directory/name`` with ``data``: a reader sees the old or the new file."""
    tmp = directory / f".{name}.tmp"  # Spool.prepare removes these after a crash
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / name)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_ship_state(directory: Path, session_id: str) -> ShipState | None:
    """The sidecar of a session (None: none, or unreadable)."""
    try:
        doc = json.loads(read_small(directory / (session_id + SHIP_SUFFIX)))
        state = ShipState.from_json(doc if isinstance(doc, dict) else {})
    except (OSError, ValueError):
        return None
    return state if state.session_id == session_id else None


def read_prefix(fd: int, size: int) -> bytes | None:
    """The file's prefix (magic, header length, header) when it is all on disk."""
    head = pread_all(fd, _PREFIX_HEAD, 0)
    if len(head) < _PREFIX_HEAD or head[: len(MAGIC)] != MAGIC:
        return None
    n = int.from_bytes(head[len(MAGIC) :], "big")
    if n > MAX_HEADER or size < _PREFIX_HEAD + n:
        return None
    return pread_all(fd, _PREFIX_HEAD + n, 0)


def queue_auth_events(directory: Path, events: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Queue authentication events (DESIGN.md fields, docs/collector.md) in the spool for
    the shipper, durably, in files of at most 1000 events. Returns the files written."""
    written = []
    for i in range(0, len(events), MAX_EVENTS):
        name = f"{EVENTS_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex}{EVENTS_SUFFIX}"
        doc = {"events": [dict(e) for e in events[i : i + MAX_EVENTS]]}
        write_atomic(directory, name, json.dumps(doc, ensure_ascii=False).encode())
        written.append(directory / name)
    return written


def is_events_file(name: str) -> bool:
    return name.startswith(EVENTS_PREFIX) and name.endswith(EVENTS_SUFFIX)
