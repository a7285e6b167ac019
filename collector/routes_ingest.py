"""Routes for hosts: enrollment, recording uploads, session records, authentication
events, backlog reports and configuration refresh (notes/issue4.md "Upload protocol").

Invariants: every route here needs a host credential, except ``POST /v1/enroll``, which
needs an unused enrollment token; the rules live in collector/ingest.py and the storage
calls run in the thread pool (they fsync), never on the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool

from sshaudit.collector import admin, ingest
from sshaudit.collector.asgi import whole_body
from sshaudit.collector.deps import Ctx, EnrollmentToken, HostCaller
from sshaudit.collector.ids import SESSION_ID_PATTERN
from sshaudit.collector.models import (
    AuthEventBatch,
    AuthEventResult,
    BacklogReport,
    EnrollRequest,
    EnrollResponse,
    ErrorBody,
    HostConfig,
    PutResult,
    SessionRecord,
    UploadResult,
)
from sshaudit.collector.problems import NotFoundError
from sshaudit.collector.storage import RecordingInfo

router = APIRouter()
SessionPath = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="a lowercase UUID")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 409, 413, 415, 422, 507)
}
_BINARY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _result(rec: RecordingInfo) -> UploadResult:
    return UploadResult(length=rec.length, frames=rec.frames, state=rec.state.value)


@router.post("/v1/enroll", tags=["hosts"], responses=_ERRORS)
def enroll(ctx: Ctx, token: EnrollmentToken, body: EnrollRequest) -> EnrollResponse:
    """Exchange a one-time enrollment token (``Authorization: Bearer sa_agent_...``) and the
    host's Ed25519 public key for a host id, a host credential, the auditor public keys,
    the user CA public keys and the policy."""
    return admin.enroll(ctx.storage, token, body, ctx.clock(), random_bytes=ctx.random_bytes)


@router.get("/v1/host/config", tags=["hosts"], responses=_ERRORS)
def host_config(ctx: Ctx, host: HostCaller) -> HostConfig:
    """The auditor keys, CA keys and policy in force (the agent refreshes them)."""
    return admin.host_config(ctx.storage, host.host_id)


@router.put("/v1/host/backlog", tags=["hosts"], responses=_ERRORS)
def report_backlog(ctx: Ctx, host: HostCaller, body: BacklogReport) -> BacklogReport:
    """What waits in the host's spool; exported as gauges on /metrics."""
    ctx.storage.report_backlog(host.host_id, body.sessions, body.bytes, ctx.clock())
    return body


@router.put(
    "/v1/sessions/{session_id}/recording",
    tags=["hosts"],
    responses=_ERRORS,
    openapi_extra=_BINARY_BODY,
)
async def put_recording_prefix(
    ctx: Ctx, host: HostCaller, session_id: SessionPath, request: Request
) -> UploadResult:
    """Start a recording with the file's prefix: magic, header length and header, exactly.
    Idempotent: the same bytes again answer 200 and change nothing."""
    body = await whole_body(request)
    out = await run_in_threadpool(
        ingest.put_prefix, ctx.storage, host, session_id, body, ctx.clock()
    )
    ctx.metrics.inc("sshaudit_collector_uploads_total", kind="prefix")
    return _result(out.recording)


@router.post(
    "/v1/sessions/{session_id}/recording",
    tags=["hosts"],
    responses=_ERRORS,
    openapi_extra=_BINARY_BODY,
)
async def append_recording(
    ctx: Ctx,
    host: HostCaller,
    session_id: SessionPath,
    request: Request,
    offset: Annotated[int, Query(ge=0, le=(1 << 62), description="the current length")],
) -> UploadResult:
    """Append whole frames (optionally ending with the signature trailer) at ``offset``,
    which must be the stored length (409 with ``length`` otherwise; a replay of stored bytes
    answers 200). A trailer is verified against the enrolled host key first (422 if not)."""
    body = await whole_body(request)
    out = await run_in_threadpool(
        ingest.append_chunk, ctx.storage, host, session_id, offset, body, ctx.clock()
    )
    ctx.metrics.inc("sshaudit_collector_uploads_total", kind="chunk")
    if not out.replay:
        ctx.metrics.inc("sshaudit_collector_upload_bytes_total", len(body))
        ctx.metrics.inc("sshaudit_collector_frames_total", out.frames)
        if out.recording.verified_at is not None:
            ctx.metrics.inc("sshaudit_collector_recordings_verified_total")
    return _result(out.recording)


# 404 `no_recording` (with "length": 0) tells an agent to start with the prefix
@router.get(
    "/v1/sessions/{session_id}/recording/status",
    tags=["hosts"],
    responses={**_ERRORS, 404: {"model": ErrorBody}},
)
def recording_status(ctx: Ctx, host: HostCaller, session_id: SessionPath) -> UploadResult:
    """What the collector holds of this host's recording: resume uploads from ``length``."""
    rec = ctx.storage.get_recording(session_id)
    if rec is None:
        ingest.check_owner(ctx.storage, host, session_id)
        raise NotFoundError(
            "no recording for this session", code="no_recording", extra={"length": 0}
        )
    if rec.host_id != host.host_id:
        raise ingest.foreign()
    return _result(rec)


@router.put("/v1/sessions/{session_id}", tags=["hosts"], responses=_ERRORS)
def put_session(
    ctx: Ctx, host: HostCaller, session_id: SessionPath, body: SessionRecord
) -> PutResult:
    """Create or update this host's session record (DESIGN.md field names). A record whose
    ``recording_status`` is no longer ``recording`` is final: it never changes again."""
    outcome = ingest.put_session(ctx.storage, host, session_id, body, ctx.clock())
    ctx.metrics.inc("sshaudit_collector_uploads_total", kind="session")
    return PutResult(session_id=session_id, outcome=outcome.value)


@router.post("/v1/auth-events", tags=["hosts"], responses=_ERRORS)
def post_auth_events(ctx: Ctx, host: HostCaller, body: AuthEventBatch) -> AuthEventResult:
    """Store this host's authentication events, all or none; a re-sent ``event_id`` with
    the same content is a duplicate (counted, not stored twice), with other content a 409."""
    added, duplicates = ingest.add_auth_events(ctx.storage, host, body.events, ctx.clock())
    ctx.metrics.inc("sshaudit_collector_uploads_total", kind="auth_events")
    ctx.metrics.inc("sshaudit_collector_auth_events_total", added)
    return AuthEventResult(added=added, duplicates=duplicates)
