"""Shipping the spool to the collector, sans-IO: what to send next for one session, and what
the collector's answer means (DESIGN.md "Shipping", docs/collector.md "Uploading a
recording"). The I/O (files, HTTP, clock, sleep) is agent/shipper_loop.py's.

A session in the spool is ``<id>.json`` (its record) and, unless it was never recorded,
``<id>.sealed``. Shipping one is, in order: the file's prefix (``PUT .../recording``), its
whole frames from the collector's length on (``POST ...?offset=N``, cut at frame boundaries
with :func:`sshaudit.collector.upload.plan_chunk`), the record (``PUT /v1/sessions/{id}``);
then, once confirmed, the local files go.

Invariants:
- the collector is the truth about what it holds: a run asks it (``GET .../status``) before
  sending frames, and every answer (200 or a 409 with ``length``) sets the offset; so a
  restart of either side neither skips nor repeats bytes (a repeat would be a harmless
  replay anyway: the collector compares and answers 200);
- a local file is deleted only when the collector confirmed the whole recording durable
  (its trailer verified; for a recording that is not ``complete`` and so has none, every
  whole frame acknowledged once the daemon closed the file) *and* accepted the final record
  (:func:`decide` returns ``DELETE`` then only);
- a final record (``recording_status`` no longer ``recording``) goes only after the
  recording's last byte, so a record saying ``complete`` never points at a partial upload;
- every refusal that retrying cannot cure parks the session (its files stay), every other
  failure backs off the whole shipper with exponential backoff and full jitter.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from sshaudit.agent.spool import RecordingStatus, SessionRecord, SpoolState
from sshaudit.collector.ids import is_host_id
from sshaudit.collector.models import MAX_DETAILS, check_json, parse_time
from sshaudit.collector.upload import plan_chunk
from sshaudit.errors import SealedFormatError

UNRECORDED_HOLD = 300.0  # seconds an unrecorded record waits for its finish time (below)
BACKOFF_BASE = 0.5


class Step(Enum):
    STATUS = "status"  # GET .../recording/status
    PREFIX = "prefix"  # PUT .../recording
    APPEND = "append"  # POST .../recording?offset=N
    RECORD = "record"  # PUT /v1/sessions/{id}
    DELETE = "delete"  # everything is confirmed: remove the local files
    FAIL = "fail"  # the local files are not shippable as they are: park, keep them
    WAIT = "wait"  # nothing to do until the spool changes


class Verdict(Enum):
    OK = "ok"  # go on with this session
    RETRY = "retry"  # the collector is down, full or refusing us: back off everything
    PARK = "park"  # this session cannot go on now: keep its files, retry it much later


@dataclass(frozen=True)
class ShipState:
    """What the collector confirmed of one session; persisted in ``<id>.ship``."""

    session_id: str
    acked: int = 0  # bytes of the sealed file the collector holds durably
    sealed: bool = False  # the collector verified the trailer: the recording is closed
    record_digest: str = ""  # SHA-256 of the last record document the collector accepted
    record_final: bool = False  # that document was final
    done: bool = False  # all confirmed: the local files may go (and are going)
    error: str = ""  # the last refusal that parked the session
    synced: bool = field(default=False, compare=False)  # acked is this run's word (not saved)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["synced"]
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ShipState:
        """Raises ValueError when ``doc`` is not a ship state."""
        types = {"session_id": str, "acked": int, "sealed": bool, "record_digest": str}
        types |= {"record_final": bool, "done": bool, "error": str}
        values: dict[str, Any] = {}
        for name, kind in types.items():
            value = doc.get(name, getattr(cls, name, None))
            if type(value) is not kind:
                raise ValueError(f"ship state: {name} must be a {kind.__name__}")
            values[name] = value
        if values["acked"] < 0:
            raise ValueError("ship state: acked must not be negative")
        return cls(**values)


@dataclass(frozen=True)
class LocalView:
    """One session as the spool holds it now (the record read *before* the file)."""

    record: SessionRecord
    size: int | None  # the sealed file's size; None: there is no file
    prefix: bytes | None = None  # the file's complete prefix (read while nothing is acked)
    window: bytes = b""  # the file from ``acked`` on, at most one chunk
    record_age: float = 0.0  # seconds since the record was last written
    record_stale: bool = False  # written before this shipper started: nobody will change it


@dataclass(frozen=True)
class Action:
    step: Step
    offset: int = 0
    body: bytes = b""
    document: Mapping[str, Any] | None = None
    digest: str = ""
    final: bool = False
    note: str = ""


@dataclass(frozen=True)
class Outcome:
    state: ShipState
    verdict: Verdict
    message: str = ""


def decide(state: ShipState, local: LocalView, limit: int, hold: float = UNRECORDED_HOLD) -> Action:
    """The next thing to do for this session."""
    if state.done:
        return Action(Step.DELETE)
    rec = local.record
    has_file = local.size is not None and rec.spool_state in (SpoolState.WRITING, SpoolState.CLOSED)
    closed = rec.spool_state is not SpoolState.WRITING
    settled = True
    if has_file:
        action = _recording_step(state, local, limit)
        if action is not None:
            return action
        # A complete recording ends with its signature trailer (the daemon signs every
        # one): it is settled only once the collector verified that. Any other finished
        # one is settled when no whole frame is left to send.
        complete = rec.recording_status is RecordingStatus.COMPLETE
        settled = state.sealed or (closed and not complete)
    doc = record_document(rec)
    digest = document_digest(doc)
    final = rec.recording_status is not RecordingStatus.RECORDING
    if digest != state.record_digest:
        if final and not (settled and _unrecorded_ready(local, hold)):
            return Action(Step.WAIT, note="the final record waits for the recording")
        return Action(Step.RECORD, document=doc, digest=digest, final=final)
    if final and closed and settled and state.record_final and _deletable(local):
        return Action(Step.DELETE)
    return Action(Step.WAIT)


def _recording_step(state: ShipState, local: LocalView, limit: int) -> Action | None:
    """The next upload of the sealed file; None when it needs none now."""
    assert local.size is not None
    if not state.synced:
        return Action(Step.STATUS)
    if state.sealed:
        return None
    if state.acked == 0:
        if local.prefix is not None:
            return Action(Step.PREFIX, body=local.prefix)
        return None  # the header is not on disk yet (or never got there: a torn file)
    if local.size < state.acked:
        return Action(
            Step.FAIL,
            note=f"the collector holds {state.acked} bytes of this recording, the spool "
            f"file only {local.size}: they are not the same file",
        )
    try:
        n = plan_chunk(local.window, limit)
    except SealedFormatError as exc:
        return Action(Step.FAIL, note=f"the spool file is not whole frames at {state.acked}: {exc}")
    if n:
        return Action(Step.APPEND, offset=state.acked, body=local.window[:n])
    # No whole frame past what the collector holds: while writing, wait for the next one;
    # once closed, what is left (if anything) is a frame a crash cut off: FORMAT.md frames
    # are authenticated whole, so a partial one can never be read, and is not shipped.
    return None


def _unrecorded_ready(local: LocalView, hold: float) -> bool:
    """An ``unrecorded`` record is final at the collector as soon as it arrives, but the
    daemon adds its finish time when the SSH session closes (agent/reconcile.py): wait for
    that, for at most ``hold`` seconds (then the alarm matters more than the finish time)."""
    rec = local.record
    if rec.recording_status is not RecordingStatus.UNRECORDED:
        return True
    return rec.session_finish is not None or local.record_stale or local.record_age >= hold


def _deletable(local: LocalView) -> bool:
    """An unrecorded record stays while the daemon may still write its finish time."""
    rec = local.record
    if rec.recording_status is not RecordingStatus.UNRECORDED:
        return True
    return rec.session_finish is not None or local.record_stale


_RESUME = ("offset_mismatch", "not_started", "recording_sealed")


def classify(status: int, body: Mapping[str, Any]) -> Verdict:
    """Whether an answer is a success (OK), a refusal of this request (PARK), or a state of
    the collector that no other request would fare better with (RETRY): down, overloaded,
    disk full (507), or our credential refused (401, 403 ``wrong_role``)."""
    if 200 <= status < 300:
        return Verdict.OK
    if status in (401, 408, 429) or status >= 500:
        return Verdict.RETRY
    if status == 403 and body.get("error") == "wrong_role":
        return Verdict.RETRY
    return Verdict.PARK


def on_response(state: ShipState, action: Action, status: int, body: Mapping[str, Any]) -> Outcome:
    """What the collector's answer to ``action`` means for this session."""
    code = body.get("error") if isinstance(body.get("error"), str) else ""
    if classify(status, body) is Verdict.RETRY:
        return Outcome(replace(state, synced=False), Verdict.RETRY, describe(status, body))
    raw = body.get("length")
    length = raw if type(raw) is int and raw >= 0 else None
    if status == 200:
        return _accepted(state, action, body, length)
    if action.step is Step.STATUS and status == 404 and code == "no_recording":
        return Outcome(replace(state, acked=0, sealed=False, synced=True, error=""), Verdict.OK)
    if action.step is Step.APPEND and status == 409 and length is not None and code in _RESUME:
        # Resume from what the collector holds (docs/collector.md, step 2).
        sealed = code == "recording_sealed"
        return Outcome(replace(state, acked=length, sealed=sealed, synced=True), Verdict.OK)
    if action.step is Step.RECORD and action.final and code == "record_immutable":
        # The collector keeps the final record it has; nothing can change it. (An
        # unrecorded record may get its finish time after it was sent: see above.)
        note = "the collector keeps an earlier final version of this session's record"
        new = replace(state, record_digest=action.digest, record_final=True, error=note)
        return Outcome(new, Verdict.OK, note)
    message = describe(status, body)
    if status == 413:
        message += " (lower [collector] upload_chunk_bytes below the collector's --max-chunk)"
    return Outcome(replace(state, synced=False, error=message), Verdict.PARK, message)


def _accepted(
    state: ShipState, action: Action, body: Mapping[str, Any], length: int | None
) -> Outcome:
    if action.step is Step.RECORD:
        new = replace(state, record_digest=action.digest, record_final=action.final, error="")
        return Outcome(new, Verdict.OK)
    if length is None:
        return Outcome(
            replace(state, synced=False), Verdict.RETRY, "the collector's answer has no length"
        )
    sealed = body.get("state") == "sealed_verified"
    return Outcome(replace(state, acked=length, sealed=sealed, synced=True, error=""), Verdict.OK)


def describe(status: int, body: Mapping[str, Any]) -> str:
    code = body.get("error")
    detail = body.get("detail")
    text = f"HTTP {status}"
    if isinstance(code, str):
        text += f" {code}"
    if isinstance(detail, str):
        text += f": {detail[:300]}"
    elif detail is not None:
        text += f": {json.dumps(detail)[:300]}"
    # It goes to the log: no control character may forge a line there.
    return "".join(c if c.isprintable() else "?" for c in text)


def backoff_delay(attempt: int, cap: float, rand: float, base: float = BACKOFF_BASE) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)),
    ``rand`` in [0, 1) (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015), so
    a fleet whose collector comes back does not return all at once."""
    return rand * min(cap, base * 2.0 ** min(attempt, 62))


# -- the session record as the collector takes it --------------------------------------

_LIMITS = {
    "user_email": 320,
    "unix_user": 64,
    "hostname": 253,
    "cert_fingerprint": 128,
    "principal": 1024,
}
_PROGRAM_TYPES = ("shell", "exec", "subsystem")


def _text(value: object, limit: int) -> str:
    """A string the collector stores: no NUL (collector/models.py), at most ``limit``."""
    return value.replace("\x00", "\ufffd")[:limit] if isinstance(value, str) else ""


def _optional_text(value: object, limit: int) -> str | None:
    return None if value is None else _text(value, limit)


def _int(value: object, low: int, high: int) -> int | None:
    return value if type(value) is int and low <= value <= high else None


def _time(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        parse_time(value)
    except ValueError:
        return None
    return value


def _address(value: str, details: dict[str, Any], name: str) -> str:
    """An IP address, or "" with the value kept in ``details`` (PAM_RHOST may be a host
    name when sshd's UseDNS is on: sshd_config(5))."""
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        details[name] = _text(value, 1024)
        return ""


def record_document(rec: SessionRecord) -> dict[str, Any]:
    """The record as ``PUT /v1/sessions/{id}`` takes it: the DESIGN.md field names plus
    ``details``, every value within the collector's bounds (a record it would refuse with a
    422 would stay in the spool forever; what does not fit goes to ``details`` or is cut)."""
    details: dict[str, Any] = dict(rec.details)
    start = _time(rec.session_start)
    finish = _time(rec.session_finish)
    if start is None:
        details["session_start_unknown"] = True
        start = finish or "1970-01-01T00:00:00Z"
    error = rec.error
    if rec.spool_state is SpoolState.DROPPED:
        details["spool_dropped"] = True
        note = "the recording was dropped from the full spool before it was all shipped"
        error = f"{error}; {note}" if error else note
    doc: dict[str, Any] = {
        "session_id": rec.session_id,
        **{name: _text(getattr(rec, name), limit) for name, limit in _LIMITS.items()},
        "target_id": rec.target_id if is_host_id(rec.target_id) else "",
        "client_address": _address(rec.client_address, details, "client_host"),
        "client_port": _int(rec.client_port, 0, 65535),
        "server_address": _address(rec.server_address, details, "server_host"),
        "server_port": _int(rec.server_port, 0, 65535),
        "session_start": start,
        "session_finish": finish,
        "program_type": rec.program_type if rec.program_type in _PROGRAM_TYPES else None,
        "command": _optional_text(rec.command, 65536),
        "exit_status": _int(rec.exit_status, -(1 << 31), (1 << 31) - 1),
        "error": _optional_text(error, 4096),
        "recording_status": rec.recording_status.value,
        "bytes_in": _int(rec.bytes_in, 0, (1 << 63) - 1) or 0,
        "bytes_out": _int(rec.bytes_out, 0, (1 << 63) - 1) or 0,
        "cert_serial": _int(rec.cert_serial, 0, (1 << 64) - 1),
    }
    try:
        check_json(details, MAX_DETAILS)
        doc["details"] = details
    except (ValueError, TypeError):
        doc["details"] = {"details_dropped": "more than the collector takes (64 KiB, 32 levels)"}
    return doc


def document_digest(doc: Mapping[str, Any]) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
