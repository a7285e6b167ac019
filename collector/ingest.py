"""The ingest rules above the storage: what a host may upload, and in which order
(notes/issue4.md "Upload protocol"). No HTTP here: the routes pass bytes and models in.

Invariants:
- a host writes only its own sessions: the header's ``host_id``, a record's ``target_id`` and
  an event's ``target_id`` must be the credential's host (an empty ``target_id`` is filled
  in), and a session already stored for another host is refused (403 ``foreign_session``);
- every check is made before anything is stored, so a refusal changes nothing; a replay
  of bytes already stored (same offset, same bytes) succeeds and changes nothing;
- the trailer's signature is verified against the *enrolled* key over the bytes as stored
  before the trailer is stored; a recording with a verified trailer is closed for good.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sshaudit.collector import upload
from sshaudit.collector.models import AuthEvent, SessionRecord
from sshaudit.collector.problems import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    UnprocessableError,
)
from sshaudit.collector.storage import (
    AuditEvent,
    Host,
    PutOutcome,
    RecordingInfo,
    RecordingState,
    Storage,
)


@dataclass(frozen=True)
class UploadOutcome:
    """What an upload did: ``recording`` is the state after it; ``frames`` the frames this
    request added (0 for a replay); ``replay`` whether the bytes were already there."""

    recording: RecordingInfo
    frames: int = 0
    replay: bool = False
    created: bool = False


def foreign() -> ForbiddenError:
    return ForbiddenError("this session belongs to another host", code="foreign_session")


def check_owner(storage: Storage, host: Host, session_id: str) -> None:
    stored = storage.get_session(session_id)
    if stored is not None and stored.record.target_id != host.host_id:
        raise foreign()
    rec = storage.get_recording(session_id)
    if rec is not None and rec.host_id != host.host_id:
        raise foreign()


def _stored(storage: Storage, session_id: str, start: int, end: int) -> bytes:
    return b"".join(storage.read_recording(session_id, start, end))


def put_prefix(
    storage: Storage, host: Host, session_id: str, body: bytes, now: datetime
) -> UploadOutcome:
    """``PUT /v1/sessions/{id}/recording``: store the file's prefix (idempotent)."""
    prefix = upload.parse_prefix(body)
    upload.check_header(
        prefix.header, session_id=session_id, host_id=host.host_id, host_key=host.public_key
    )
    check_owner(storage, host, session_id)
    rec = storage.get_recording(session_id)
    if rec is None:
        info = RecordingInfo(
            session_id=session_id,
            host_id=host.host_id,
            header_length=len(body),
            length=len(body),
            frames=0,
            state=RecordingState.OPEN,
            created_at=now,
            updated_at=now,
        )
        if storage.start_recording(info, body):
            return UploadOutcome(info, created=True)
        rec = storage.get_recording(session_id)
        if rec is None or rec.host_id != host.host_id:
            raise foreign()
    if rec.header_length != len(body) or _stored(storage, session_id, 0, len(body)) != body:
        raise ConflictError(
            "this session's recording was started with a different header",
            code="prefix_mismatch",
            extra={"length": rec.length},
        )
    return UploadOutcome(rec, replay=True)


def append_chunk(
    storage: Storage, host: Host, session_id: str, offset: int, body: bytes, now: datetime
) -> UploadOutcome:
    """``POST /v1/sessions/{id}/recording?offset=N``: append whole frames (and the trailer)."""
    rec = storage.get_recording(session_id)
    if rec is None:
        check_owner(storage, host, session_id)
        raise ConflictError(
            "no recording started for this session: PUT its prefix first",
            code="not_started",
            extra={"length": 0},
        )
    if rec.host_id != host.host_id:
        raise foreign()
    if offset < rec.header_length:
        raise BadRequestError(
            f"offset {offset} is inside the prefix (frames start at {rec.header_length})",
            code="bad_offset",
        )
    if offset < rec.length:
        return _replay(storage, rec, offset, body)
    if offset > rec.length:
        raise ConflictError(
            f"offset {offset} is past the recording's length {rec.length}: resume from there",
            code="offset_mismatch",
            extra={"length": rec.length},
        )
    if rec.state is RecordingState.SEALED_VERIFIED:
        raise ConflictError(
            "the recording is sealed", code="recording_sealed", extra={"length": rec.length}
        )
    scan = upload.scan_chunk(body)
    if scan.signature is not None:
        _verify(storage, host, rec, memoryview(body)[: scan.frames_end], scan, now)
    new = storage.append_recording(
        session_id, offset, body, scan.frames, now, seal=scan.signature is not None
    )
    if scan.signature is not None:
        storage.audit(
            AuditEvent(
                now,
                f"host:{host.host_id}",
                "recording_verified",
                session_id,
                {"length": new.length, "frames": new.frames},
            )
        )
    return UploadOutcome(new, frames=scan.frames)


def _replay(storage: Storage, rec: RecordingInfo, offset: int, body: bytes) -> UploadOutcome:
    end = offset + len(body)
    if end > rec.length:
        raise ConflictError(
            f"the chunk overlaps the stored recording (length {rec.length}) and goes past it: "
            "resume from the stored length",
            code="offset_mismatch",
            extra={"length": rec.length},
        )
    if _stored(storage, rec.session_id, offset, end) != body:
        raise ConflictError(
            f"other bytes are stored at offset {offset}: recordings never change",
            code="replay_mismatch",
            extra={"length": rec.length},
        )
    return UploadOutcome(rec, replay=True)


def _verify(
    storage: Storage,
    host: Host,
    rec: RecordingInfo,
    frames: memoryview,
    scan: upload.ChunkScan,
    now: datetime,
) -> None:
    assert scan.signature is not None
    if rec.frames + scan.frames == 0:
        raise UnprocessableError("a signature trailer needs frames before it", code="no_frames")
    stored = storage.read_recording(rec.session_id, upload.HEADER_START, rec.length)
    digest = upload.signed_digest(itertools.chain(stored, (frames,)))
    try:
        upload.verify_signature(host.public_key, digest, scan.signature)
    except UnprocessableError:
        storage.audit(
            AuditEvent(now, f"host:{host.host_id}", "recording_signature_invalid", rec.session_id)
        )
        raise


def put_session(
    storage: Storage, host: Host, session_id: str, record: SessionRecord, now: datetime
) -> PutOutcome:
    """``PUT /v1/sessions/{id}``: create or update this host's session record."""
    if record.session_id != session_id:
        raise UnprocessableError(
            "the record's session_id does not match the URL", code="session_id_mismatch"
        )
    if record.target_id not in ("", host.host_id):
        raise ForbiddenError("target_id is not this credential's host", code="foreign_session")
    record = record.model_copy(
        update={"target_id": host.host_id, "hostname": record.hostname or host.hostname}
    )
    rec = storage.get_recording(session_id)
    if rec is not None and rec.host_id != host.host_id:
        raise foreign()
    return storage.put_session(record, now)


def add_auth_events(
    storage: Storage, host: Host, events: Sequence[AuthEvent], now: datetime
) -> tuple[int, int]:
    """``POST /v1/auth-events``: this host's events, all or none."""
    owned = []
    for event in events:
        if event.target_id not in ("", host.host_id):
            raise ForbiddenError(
                f"event {event.event_id}: target_id is not this credential's host",
                code="foreign_event",
            )
        owned.append(event.model_copy(update={"target_id": host.host_id}))
    return storage.add_auth_events(owned, now)
