"""Shared helpers for the shipper tests (test_shipper_*.py): spools written with the real
SealedWriter and Spool APIs, and a fake collector that keeps the upload protocol's rules
(docs/collector.md "Uploading a recording") in memory, parsing the framing on its own."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sshaudit.agent.config import OnSpoolFull
from sshaudit.agent.ship_http import Reply, ShipError
from sshaudit.agent.spool import RecordingStatus, SessionRecord, Spool, SpoolFile, SpoolState
from sshaudit.collector.models import SessionRecord as CollectorRecord
from sshaudit.keys import AuditorPrivateKey
from sshaudit.sealed import SealedWriter

AUDITOR = AuditorPrivateKey.generate()
HOST_KEY = Ed25519PrivateKey.generate()
HOST_ID = "0b7a4a3e-5a5e-4d49-9f0e-0d6c1f6f0a11"
T0 = datetime(2026, 11, 22, 9, 0, 0, tzinfo=UTC)
_U32 = struct.Struct(">I")


def make_spool(directory: Path) -> Spool:
    spool = Spool(directory, max_bytes=1 << 40, on_full=OnSpoolFull.REFUSE)
    spool.prepare()
    return spool


def cast_pieces(n: int, size: int = 40) -> list[bytes]:
    header = b'{"version": 2, "width": 80, "height": 24, "timestamp": 1795000000}\n'
    line = "x" * size
    return [header] + [f'[{i}.5, "o", "{i} {line}\\r\\n"]\n'.encode() for i in range(n)]


@dataclass
class Recording:
    """A recording in a spool, written frame by frame like the daemon does."""

    spool: Spool
    session_id: str
    writer: SealedWriter
    file: SpoolFile
    record: SessionRecord
    data: bytearray = field(default_factory=bytearray)

    def append(self, *pieces: bytes) -> None:
        for piece in pieces:
            out = bytes(self.writer.write(piece))
            self.file.append(out)
            self.data += out

    def close(self, status: RecordingStatus = RecordingStatus.COMPLETE, **fields: Any) -> None:
        if status is RecordingStatus.COMPLETE:
            out = bytes(self.writer.close(b"exit\r\n"))
            self.file.append(out)
            self.data += out
        self.file.close()
        fields.setdefault("session_finish", "2026-11-22T09:05:00Z")
        fields.setdefault("exit_status", 0)
        self.record = replace(
            self.record, recording_status=status, spool_state=SpoolState.CLOSED, **fields
        )
        self.spool.write_record(self.record)


def start_recording(
    spool: Spool,
    *,
    host_id: str = HOST_ID,
    host_key: Ed25519PrivateKey = HOST_KEY,
    auditor: AuditorPrivateKey = AUDITOR,
    session_id: str | None = None,
    **fields: Any,
) -> Recording:
    sid = session_id or str(uuid.uuid4())
    writer = SealedWriter(
        recipients=[auditor.public],
        session_id=sid,
        host_id=host_id,
        created_at=T0,
        host_key=host_key,
    )
    file = spool.create_recording(sid)
    prefix = writer.start()
    file.append(prefix)
    base: dict[str, Any] = {
        "unix_user": "jdoe",
        "target_id": host_id,
        "hostname": "web-1",
        "client_address": "192.0.2.7",
        "client_port": 50022,
        "server_address": "198.51.100.1",
        "server_port": 22,
        "session_start": "2026-11-22T09:00:00Z",
        "program_type": "shell",
    }
    record = SessionRecord(session_id=sid, **{**base, **fields})
    spool.write_record(record)
    return Recording(spool, sid, writer, file, record, bytearray(prefix))


def write_recording(spool: Spool, pieces: Sequence[bytes], **fields: Any) -> Recording:
    rec = start_recording(spool, **fields)
    rec.append(*pieces)
    rec.close()
    return rec


def frame_count(data: bytes) -> tuple[int, bool]:
    """Frames in a sealed file and whether it ends with a trailer (FORMAT.md "Layout")."""
    (n,) = _U32.unpack_from(data, 10)
    pos, frames = 14 + n, 0
    while pos + 4 <= len(data):
        (length,) = _U32.unpack_from(data, pos)
        if length == 0xFFFFFFFF:
            return frames, True
        pos += 4 + length
        frames += 1
    return frames, False


def _whole_frames(chunk: bytes) -> bool:
    pos = 0
    while pos < len(chunk):
        if len(chunk) - pos < 4:
            return False
        (n,) = _U32.unpack_from(chunk, pos)
        if n == 0xFFFFFFFF:
            if len(chunk) - pos < 8:
                return False
            (t,) = _U32.unpack_from(chunk, pos + 4)
            return bool(pos + 8 + t == len(chunk))
        pos += 4 + n
    return pos == len(chunk)


@dataclass
class FakeCollector:
    """A Transport that answers like the collector; ``down`` makes it unreachable,
    ``status`` answers every request with that status, ``lose_answers`` stores the next
    uploads but loses their answers (as a connection cut right after the collector's 200)."""

    files: dict[str, bytearray] = field(default_factory=dict)
    sealed: set[str] = field(default_factory=set)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    backlog: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    stored: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    down: bool = False
    status: int | None = None
    lose_answers: int = 0
    prefix_len: dict[str, int] = field(default_factory=dict)

    def send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        json_body: Any = None,
    ) -> Reply:
        offset = int((params or {}).get("offset", -1))
        self.calls.append((method, path, offset))
        if self.down:
            raise ShipError("collector https://fake: cannot connect")
        if self.status is not None:
            return Reply(self.status, {"error": "storage_full", "detail": "disk full"})
        reply = self._route(method, path, offset, content, json_body)
        if self.lose_answers and reply.status == 200 and method in ("POST", "PUT"):
            self.lose_answers -= 1
            raise ShipError("collector https://fake: connection reset")
        return reply

    def close(self) -> None:
        self.calls.append(("CLOSE", "", -1))

    def _route(self, method: str, path: str, offset: int, content: bytes | None, doc: Any) -> Reply:
        parts = path.strip("/").split("/")
        if path == "/v1/host/backlog":
            self.backlog.append(doc)
            return Reply(200, doc)
        if path == "/v1/auth-events":
            for event in doc["events"]:
                self.events[event["event_id"]] = event
            return Reply(200, {"added": len(doc["events"]), "duplicates": 0})
        sid = parts[2]
        if len(parts) == 3 and method == "PUT":
            return self._record(sid, doc)
        if parts[-1] == "status":
            if sid not in self.files:
                return Reply(404, {"error": "no_recording", "detail": "none", "length": 0})
            return self._ok(sid)
        assert content is not None
        if method == "PUT":
            return self._prefix(sid, content)
        return self._append(sid, offset, content)

    def _ok(self, sid: str) -> Reply:
        state = "sealed_verified" if sid in self.sealed else "open"
        return Reply(200, {"length": len(self.files[sid]), "frames": 0, "state": state})

    def _conflict(self, sid: str, code: str) -> Reply:
        length = len(self.files.get(sid, b""))
        return Reply(409, {"error": code, "detail": code, "length": length})

    def _prefix(self, sid: str, body: bytes) -> Reply:
        if sid not in self.files:
            self.files[sid] = bytearray(body)
            self.prefix_len[sid] = len(body)
            return self._ok(sid)
        if bytes(self.files[sid][: len(body)]) != body or self.prefix_len[sid] != len(body):
            return self._conflict(sid, "prefix_mismatch")
        return self._ok(sid)

    def _append(self, sid: str, offset: int, body: bytes) -> Reply:
        stored = self.files.get(sid)
        if stored is None:
            return self._conflict(sid, "not_started")
        end = offset + len(body)
        if offset < len(stored):
            if end > len(stored):
                return self._conflict(sid, "offset_mismatch")
            if bytes(stored[offset:end]) != body:
                return self._conflict(sid, "replay_mismatch")
            return self._ok(sid)
        if offset > len(stored):
            return self._conflict(sid, "offset_mismatch")
        if sid in self.sealed:
            return self._conflict(sid, "recording_sealed")
        if not _whole_frames(body):
            return Reply(400, {"error": "malformed_chunk", "detail": "not whole frames"})
        stored += body
        self.stored.setdefault(sid, []).append((offset, len(body)))
        if frame_count(bytes(stored))[1]:
            self.sealed.add(sid)
        return self._ok(sid)

    def _record(self, sid: str, doc: dict[str, Any]) -> Reply:
        CollectorRecord.model_validate(doc)  # what the real one would take
        old = self.records.get(sid)
        if old is not None and old["recording_status"] != "recording" and old != doc:
            return Reply(409, {"error": "record_immutable", "detail": "final"})
        self.records[sid] = doc
        return Reply(200, {"session_id": sid, "outcome": "created" if old is None else "updated"})
