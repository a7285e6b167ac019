"""Routes for auditors: list and show sessions, list authentication events, download sealed
recordings (DESIGN.md "The collector", query).

Invariants: auditor tokens only; listings are newest first, paginated with an opaque keyset
cursor (a page costs the same however deep), every filter an exact match; a download serves
only committed bytes, with ``Content-Length``, a strong ``ETag`` (the committed length names
the content, since a recording only grows) and single byte ranges (RFC 9110 section 14).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from sshaudit.collector.deps import AuditorToken, Ctx
from sshaudit.collector.ids import EVENT_ID_PATTERN, SESSION_ID_PATTERN, is_session_id
from sshaudit.collector.models import (
    AuthEventOut,
    AuthEventPage,
    ErrorBody,
    ProgramType,
    RecordingStatus,
    RecordingView,
    SessionOut,
    SessionPage,
    format_time,
    parse_time,
    to_us,
)
from sshaudit.collector.problems import BadRequestError, NotFoundError, RangeNotSatisfiableError
from sshaudit.collector.storage import (
    AuthEventQuery,
    RecordingInfo,
    SessionQuery,
    StoredAuthEvent,
    StoredSession,
)

router = APIRouter(tags=["auditors"])
SessionPath = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="a lowercase UUID")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 416, 422)
}
_EVENT_ID_RE = re.compile(EVENT_ID_PATTERN)
_RANGE_RE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")

Filter = Annotated[str | None, Query(max_length=320)]
TimeParam = Annotated[str | None, Query(max_length=40, description="RFC 3339")]
Cursor = Annotated[str | None, Query(max_length=256)]


def _limit(ctx: Ctx, limit: int | None) -> int:
    return ctx.settings.page_default if limit is None else limit


def _time_us(name: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return to_us(parse_time(text))
    except ValueError:
        raise BadRequestError(f"{name} must be an RFC 3339 time", code="invalid_time") from None


def encode_cursor(us: int, ident: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([us, ident]).encode()).rstrip(b"=").decode()


def decode_cursor(text: str | None, id_ok: re.Pattern[str]) -> tuple[int, str] | None:
    if text is None:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        doc = None
    ok = (
        isinstance(doc, list)
        and len(doc) == 2
        and type(doc[0]) is int
        and isinstance(doc[1], str)
        and id_ok.fullmatch(doc[1]) is not None
    )
    if not ok:
        raise BadRequestError("not a cursor this collector gave out", code="invalid_cursor")
    assert isinstance(doc, list)
    return doc[0], doc[1]


def recording_view(rec: RecordingInfo | None) -> RecordingView | None:
    if rec is None:
        return None
    verified = None if rec.verified_at is None else format_time(rec.verified_at)
    return RecordingView(
        length=rec.length,
        frames=rec.frames,
        state=rec.state.value,
        header_length=rec.header_length,
        verified_at=verified,
    )


def session_out(stored: StoredSession) -> SessionOut:
    return SessionOut(
        **stored.record.model_dump(),
        received_at=format_time(stored.received_at),
        updated_at=format_time(stored.updated_at),
        recording=recording_view(stored.recording),
    )


def event_out(stored: StoredAuthEvent) -> AuthEventOut:
    return AuthEventOut(**stored.event.model_dump(), received_at=format_time(stored.received_at))


@router.get("/v1/sessions", responses=_ERRORS)
def list_sessions(
    ctx: Ctx,
    _: AuditorToken,
    user_email: Filter = None,
    unix_user: Filter = None,
    target_id: Filter = None,
    hostname: Filter = None,
    client_address: Filter = None,
    program_type: ProgramType | None = None,
    recording_status: RecordingStatus | None = None,
    since: TimeParam = None,
    until: TimeParam = None,
    cursor: Cursor = None,
    limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
) -> SessionPage:
    """Session records, newest ``session_start`` first; ``since`` inclusive, ``until``
    exclusive; pass ``next_cursor`` back as ``cursor`` for the next page."""
    text = {
        "user_email": user_email,
        "unix_user": unix_user,
        "target_id": target_id,
        "hostname": hostname,
        "client_address": client_address,
        "program_type": None if program_type is None else program_type.value,
        "recording_status": None if recording_status is None else recording_status.value,
    }
    n = _limit(ctx, limit)
    query = SessionQuery(
        filters={k: v for k, v in text.items() if v is not None},
        since_us=_time_us("since", since),
        until_us=_time_us("until", until),
        after=decode_cursor(cursor, re.compile(SESSION_ID_PATTERN)),
        limit=n + 1,
    )
    rows = ctx.storage.query_sessions(query)
    more = len(rows) > n
    rows = rows[:n]
    last = rows[-1].record if more else None
    return SessionPage(
        items=[session_out(r) for r in rows],
        next_cursor=None
        if last is None
        else encode_cursor(to_us(parse_time(last.session_start)), last.session_id),
    )


@router.get("/v1/sessions/{session_id}", responses=_ERRORS)
def get_session(ctx: Ctx, _: AuditorToken, session_id: SessionPath) -> SessionOut:
    stored = ctx.storage.get_session(session_id)
    if stored is None:
        raise NotFoundError("no session record with this id", code="unknown_session")
    return session_out(stored)


@router.get("/v1/auth-events", responses=_ERRORS)
def list_auth_events(
    ctx: Ctx,
    _: AuditorToken,
    user_email: Filter = None,
    unix_user: Filter = None,
    target_id: Filter = None,
    ip_address: Filter = None,
    method: Annotated[str | None, Query(max_length=32)] = None,
    allowed: bool | None = None,
    since: TimeParam = None,
    until: TimeParam = None,
    cursor: Cursor = None,
    limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
) -> AuthEventPage:
    """Authentication events, newest ``created_at`` first; filters and paging as sessions."""
    given: dict[str, str | bool | None] = {
        "user_email": user_email,
        "unix_user": unix_user,
        "target_id": target_id,
        "ip_address": ip_address,
        "method": method,
        "allowed": allowed,
    }
    n = _limit(ctx, limit)
    query = AuthEventQuery(
        filters={k: v for k, v in given.items() if v is not None},
        since_us=_time_us("since", since),
        until_us=_time_us("until", until),
        after=decode_cursor(cursor, _EVENT_ID_RE),
        limit=n + 1,
    )
    rows = ctx.storage.query_auth_events(query)
    more = len(rows) > n
    rows = rows[:n]
    last = rows[-1].event if more else None
    return AuthEventPage(
        items=[event_out(r) for r in rows],
        next_cursor=None
        if last is None
        else encode_cursor(to_us(parse_time(last.created_at)), last.event_id),
    )


def parse_range(header: str, length: int) -> tuple[int, int] | None:
    """One byte range ``[start, end)`` of RFC 9110 section 14.1.2, or None to send it all
    (several ranges: allowed to be ignored, section 14.2); 416 if unsatisfiable."""
    if "," in header:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    unsatisfiable = RangeNotSatisfiableError(
        f"the range is not satisfiable (the recording has {length} bytes)",
        headers={"Content-Range": f"bytes */{length}"},
    )
    if m is None or (not m.group(1) and not m.group(2)):
        raise unsatisfiable
    first, last = m.group(1), m.group(2)
    if not first:  # a suffix range: the last N bytes
        n = int(last)
        if n == 0 or length == 0:
            raise unsatisfiable
        return max(length - n, 0), length
    start = int(first)
    end = length if not last else min(int(last) + 1, length)
    if start >= length or (last and int(last) < start):
        raise unsatisfiable
    return start, end


@router.get(
    "/v1/sessions/{session_id}/recording",
    responses={
        **_ERRORS,
        200: {"content": {"application/octet-stream": {}}, "description": "the sealed file"},
        206: {"content": {"application/octet-stream": {}}, "description": "a byte range"},
    },
    response_class=Response,
)
def download(ctx: Ctx, _: AuditorToken, session_id: SessionPath, request: Request) -> Response:
    """The sealed recording as stored (FORMAT.md), streamed; resumable with ``Range``."""
    if not is_session_id(session_id):
        raise BadRequestError("not a session id", code="invalid_session_id")
    rec = ctx.storage.get_recording(session_id)
    if rec is None:
        raise NotFoundError("no recording for this session", code="no_recording")
    etag = f'"len-{rec.length}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, no-transform",
        "Content-Disposition": f'attachment; filename="{session_id}.sealed"',
        "X-Sshaudit-Recording-State": rec.state.value,
    }
    if request.headers.get("if-none-match") in (etag, "*"):
        return Response(status_code=304, headers=headers)
    span = None
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header is not None and (if_range is None or if_range == etag):
        span = parse_range(range_header, rec.length)
    start, end = span or (0, rec.length)
    headers["Content-Length"] = str(end - start)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{rec.length}"
    return StreamingResponse(
        ctx.storage.read_recording(session_id, start, end),
        status_code=206 if span is not None else 200,
        media_type="application/octet-stream",
        headers=headers,
    )
