"""The API's JSON bodies (pydantic v2), with DESIGN.md's field names ("Session record
fields", "Authentication event fields"), which are also the export's.

Invariants: every model is frozen and refuses unknown fields (a misspelt field is a 422, not
silently dropped); every string is bounded and NUL-free (SQLite and log lines stay sane);
integers are strict (``"1"`` is not 1) and within the range the storage can hold; times are
RFC 3339 and come out normalised to UTC with a ``Z``.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

from sshaudit.collector.ids import EVENT_ID_PATTERN, HOST_ID_PATTERN, SESSION_ID_PATTERN

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_DETAILS = 64 * 1024
MAX_DEPTH = 32
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)


def parse_time(text: str) -> datetime:
    """Parse RFC 3339 (section 5.6) to an aware UTC datetime; fractions past microseconds
    are cut (the storage keeps microseconds). Raises ValueError."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError("must be an RFC 3339 time, e.g. 2026-11-22T01:02:03Z")
    date, time, frac, zone = m.groups()
    zone = "+00:00" if zone in ("Z", "z") else zone
    micro = (frac or "").ljust(6, "0")[:6]
    try:
        moment = datetime.fromisoformat(f"{date}T{time}.{micro}{zone}").astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError("not a valid RFC 3339 time") from exc
    return moment


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with a ``Z``; microseconds only when there are some."""
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def to_us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def _time(text: str) -> str:
    return format_time(parse_time(text))


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain NUL")
    return text


def _address(text: str) -> str:
    if text:
        try:
            return str(ipaddress.ip_address(text))
        except ValueError as exc:
            raise ValueError("must be an IP address or empty") from exc
    return text


def check_json(doc: JsonValue, limit: int) -> None:
    """Raise ValueError unless ``doc`` is at most ``MAX_DEPTH`` deep, has only finite
    numbers (JSON has no NaN or Infinity, RFC 8259 section 6, though Python's parser takes
    them) and serializes to at most ``limit`` bytes. Iterative: no recursion to exhaust."""
    stack: list[tuple[JsonValue, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"must be at most {MAX_DEPTH} levels deep")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must not contain NaN or Infinity")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    if len(json.dumps(doc, separators=(",", ":"))) > limit:
        raise ValueError(f"must be at most {limit} bytes of JSON")


def _details(doc: dict[str, JsonValue]) -> dict[str, JsonValue]:
    check_json(doc, MAX_DETAILS)
    return doc


_NoNul = AfterValidator(_no_nul)
Text64 = Annotated[str, Field(max_length=64, strict=True), _NoNul]
Text128 = Annotated[str, Field(max_length=128, strict=True), _NoNul]
Text253 = Annotated[str, Field(max_length=253, strict=True), _NoNul]
Text320 = Annotated[str, Field(max_length=320, strict=True), _NoNul]
Text1024 = Annotated[str, Field(max_length=1024, strict=True), _NoNul]
Text4096 = Annotated[str, Field(max_length=4096, strict=True), _NoNul]
Text64K = Annotated[str, Field(max_length=65536, strict=True), _NoNul]


Time = Annotated[str, Field(max_length=40, strict=True), AfterValidator(_time)]
Address = Annotated[str, Field(max_length=64, strict=True), AfterValidator(_address)]
Port = Annotated[int, Field(ge=0, le=65535, strict=True)]
Count = Annotated[int, Field(ge=0, le=(1 << 63) - 1, strict=True)]
Serial = Annotated[int, Field(ge=0, le=(1 << 64) - 1, strict=True)]  # OpenSSH: u64
SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN, strict=True)]
HostId = Annotated[str, Field(pattern=HOST_ID_PATTERN, strict=True)]
EventId = Annotated[str, Field(pattern=EVENT_ID_PATTERN, strict=True)]
Details = Annotated[dict[str, JsonValue], AfterValidator(_details)]
MAX_POLICY = 64 * 1024


def _policy(doc: dict[str, JsonValue]) -> dict[str, JsonValue]:
    check_json(doc, MAX_POLICY)
    return doc


PolicyDocument = Annotated[dict[str, JsonValue], AfterValidator(_policy)]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ProgramType(Enum):
    SHELL = "shell"
    EXEC = "exec"
    SUBSYSTEM = "subsystem"


class RecordingStatus(Enum):
    RECORDING = "recording"
    COMPLETE = "complete"
    TRUNCATED = "truncated"
    UNRECORDED = "unrecorded"
    RECORDER_LOST = "recorder_lost"


class SessionRecord(BaseModel):
    """DESIGN.md "Session record fields"; ``details`` holds anything more the agent knows."""

    model_config = _FROZEN

    session_id: SessionId
    user_email: Text320 = ""
    unix_user: Text64 = ""
    target_id: Annotated[str, Field(pattern=r"^$|" + HOST_ID_PATTERN, strict=True)] = ""
    hostname: Text253 = ""
    client_address: Address = ""
    client_port: Port | None = None
    server_address: Address = ""
    server_port: Port | None = None
    session_start: Time
    session_finish: Time | None = None
    program_type: ProgramType | None = None
    command: Text64K | None = None
    exit_status: Annotated[int, Field(ge=-(1 << 31), lt=1 << 31, strict=True)] | None = None
    error: Text4096 | None = None
    recording_status: RecordingStatus
    bytes_in: Count = 0
    bytes_out: Count = 0
    cert_serial: Serial | None = None
    cert_fingerprint: Text128 = ""
    principal: Text1024 = ""
    details: Details | None = None


class AuthEvent(BaseModel):
    """DESIGN.md "Authentication event fields"; ``event_id`` makes a re-send harmless."""

    model_config = _FROZEN

    event_id: EventId
    created_at: Time
    user_email: Text320 = ""
    unix_user: Text64 = ""
    ip_address: Address = ""
    target_id: Annotated[str, Field(pattern=r"^$|" + HOST_ID_PATTERN, strict=True)] = ""
    method: Annotated[str, Field(pattern=r"^$|^[a-z0-9][a-z0-9_-]{0,31}$", strict=True)] = ""
    allowed: Annotated[bool, Field(strict=True)]
    reason: Text1024 = ""
    cert_serial: Serial | None = None
    cert_fingerprint: Text128 = ""
    session_id: SessionId | None = None


class RecordingView(BaseModel):
    """What the collector holds of a session's sealed recording."""

    model_config = _FROZEN

    length: int
    frames: int
    state: str  # "open" or "sealed_verified"
    header_length: int
    verified_at: str | None = None


class SessionOut(SessionRecord):
    received_at: str
    updated_at: str
    recording: RecordingView | None = None


class AuthEventOut(AuthEvent):
    received_at: str


class SessionPage(BaseModel):
    items: list[SessionOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page")


class AuthEventPage(BaseModel):
    items: list[AuthEventOut]
    next_cursor: str | None


class AuthEventBatch(BaseModel):
    model_config = _FROZEN

    events: list[AuthEvent] = Field(min_length=1, max_length=1000)


class AuthEventResult(BaseModel):
    added: int
    duplicates: int


class PutResult(BaseModel):
    session_id: str
    outcome: str  # "created", "updated" or "unchanged"


class UploadResult(BaseModel):
    """The answer to a recording upload: what the collector now holds, durably."""

    length: int
    frames: int
    state: str
    durable: bool = True


class ErrorBody(BaseModel):
    """Every 4xx/5xx: a stable code, a message (or validation errors), sometimes context."""

    model_config = ConfigDict(extra="allow")

    error: str
    detail: Any


class EnrollRequest(BaseModel):
    model_config = _FROZEN

    hostname: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$", strict=True)
    ]
    host_public_key: Annotated[str, Field(max_length=64, strict=True)] = Field(
        description="the host's Ed25519 signing key: 32 raw bytes, standard base64 (FORMAT.md)"
    )


class AuditorKeyOut(BaseModel):
    kid: str
    public_key: str
    comment: str
    added_at: str


class HostConfig(BaseModel):
    """What a host needs to run: refreshed by the agent (GET /v1/host/config)."""

    host_id: str
    auditor_keys: list[AuditorKeyOut]
    ca_keys: list[str] = Field(description="OpenSSH public key lines for TrustedUserCAKeys")
    policy: dict[str, JsonValue]
    policy_version: int


class EnrollResponse(HostConfig):
    credential: str = Field(description="the host's token: shown once, store it 0600")


class BacklogReport(BaseModel):
    model_config = _FROZEN

    sessions: Count
    bytes: Count
